"""Tests of `sdlm optimize` under faults: bad input, signals, resume and unusual text.

Every bad input must end with exit code 2, one `error:` line on stderr that names the value,
where it came from and what to do, no traceback, and no new run directory. docs/troubleshooting.md
lists the same cases with their messages.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from sdlm.cli import ExitCode
from test_cli import (  # noqa: F401 (fixtures)
    INIT_TEXT,
    UNREACHED_TARGET,
    error_lines,
    invoke,
    reached_target_ids,
    single_thread,
    tiny,
    tiny_cli_process,
    tiny_model,
    write_config,
)

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def base_config(**changes) -> dict:
    """A small valid config on the tiny model, with sections replaced or extended by `changes`."""
    config = {
        "prompt": {"length": 4, "samples": 1},
        "objective": {"target": UNREACHED_TARGET},
        "optimizer": {"steps": 2},
        "eval": {"every": 1},
        "output_dir": "runs",
    }
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def assert_one_line_error(result, *parts: str) -> str:
    assert result.exit_code == ExitCode.INVALID_INPUT, result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for part in parts:
        assert part in lines[0]
    return lines[0]


# -- the bad-input table -----------------------------------------------------------------

# (id, config file text or a dict for base_config, extra CLI arguments, expected parts of the message)
BAD_CONFIGS = [
    ("malformed-yaml", "objective:\n  target: hi\noptimizer: [\n", (), ["c.yaml:4", "invalid YAML"]),
    ("yaml-tab-indent", "objective:\n\ttarget: hi\n", (), ["c.yaml:2", "invalid YAML"]),
    ("misspelt-key", base_config(optimizer={"stepz": 3}), (), ["c.yaml:", "unknown key 'optimizer.stepz'", "did you mean 'optimizer.steps'"]),
    ("unknown-section", base_config(optimiser={"lr": 0.1}), (), ["c.yaml:", "unknown key 'optimiser'", "did you mean 'optimizer'"]),
    ("key-in-wrong-section", base_config(prompt={"lr": 0.1}), (), ["unknown key 'prompt.lr'", "did you mean 'optimizer.lr'"]),
    ("wrong-type-steps", base_config(optimizer={"steps": "many"}), (), ["optimizer.steps: expected an integer >= 1, got 'many'"]),
    ("wrong-type-section", base_config(prompt=[1, 2]), (), ["prompt: expected a mapping of keys"]),
    ("wrong-type-bool", base_config(eval={"stop_on_success": "maybe"}), (), ["eval.stop_on_success: expected true or false"]),
    ("zero-steps", base_config(optimizer={"steps": 0}), (), ["optimizer.steps: expected an integer >= 1, got 0"]),
    ("negative-steps-flag", base_config(), ("--steps", "-3"), ["--steps -3: optimizer.steps: expected an integer >= 1, got -3"]),
    ("zero-lr", base_config(optimizer={"lr": 0}), (), ["optimizer.lr: expected a number > 0, got 0"]),
    ("negative-lr-override", base_config(), ("--set", "optimizer.lr=-0.5"), ["--set optimizer.lr=-0.5: optimizer.lr: expected a number > 0"]),
    ("zero-length", base_config(prompt={"length": 0}), (), ["prompt.length: expected an integer >= 1, got 0"]),
    ("zero-samples", base_config(prompt={"samples": 0}), (), ["prompt.samples: expected an integer >= 1, got 0"]),
    ("zero-temperature", base_config(stgs={"temperature": 0}), (), ["stgs.temperature: expected a number > 0, got 0"]),
    ("negative-temperature", base_config(stgs={"temperature": -1.0}), (), ["stgs.temperature: expected a number > 0, got -1.0"]),
    ("negative-init-scale", base_config(prompt={"init_scale": -2}), (), ["prompt.init_scale: expected a number > 0"]),
    ("zero-max-non-finite", base_config(optimizer={"max_non_finite": 0}), (), ["optimizer.max_non_finite: expected an integer >= 1"]),
    ("negative-checkpoint-every", base_config(eval={"checkpoint_every": -5}), (), ["eval.checkpoint_every: expected an integer >= 0"]),
    ("empty-target", base_config(objective={"target": ""}), (), ["objective.target: expected non-empty text or null, got ''"]),
    ("missing-target", {**base_config(), "objective": {"mode": "generation"}}, (), ["objective.target: missing"]),
    ("empty-init-text", base_config(prompt={"init_text": ""}), (), ["prompt.init_text: expected non-empty text or null"]),
    ("negative-seed", base_config(seed=-1), (), ["seed: expected an integer >= 0"]),
    ("bad-device-name", base_config(model={"device": "gpu"}), (), ["model.device: expected auto, cpu, cuda, cuda:N or mps, got 'gpu'"]),
    ("bad-dtype", base_config(model={"dtype": "float8"}), (), ["model.dtype: expected one of 'float32', 'bfloat16', 'float16'"]),
    ("run-name-with-slash", base_config(run_name="a/b"), (), ["run_name: expected a folder name without slashes"]),
]


@pytest.mark.parametrize("config, args, parts", [case[1:] for case in BAD_CONFIGS], ids=[case[0] for case in BAD_CONFIGS])
def test_bad_config_rejected(tiny, tmp_path, config, args, parts):
    path = tmp_path / "c.yaml"
    if isinstance(config, str):
        path.write_text(config)
    else:
        write_config(path, **config)
    result = invoke("optimize", path, *args)
    assert_one_line_error(result, *parts)
    assert result.stdout == ""
    assert not (tmp_path / "runs").exists() or list((tmp_path / "runs").iterdir()) == []


YAML_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
    | st.sampled_from(["0", "-1", "1e-3", "nan", "", "cpu", "cuda:9", "adam", "<|endoftext|>", "\n\n"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
KNOWN_KEYS = {
    "prompt": ["length", "samples", "init_text", "prefix"],
    "objective": ["target", "target_ids", "mode"],
    "optimizer": ["lr", "steps", "max_non_finite", "name"],
    "eval": ["every", "checkpoint_every"],
    "search": ["polish_every", "polish_width", "restart_patience", "restart_bias"],
    "model": ["device", "dtype"],
}
RANDOM_CONFIGS = st.dictionaries(
    st.sampled_from([*KNOWN_KEYS, "seed", "run_name", "optimiser"]),
    st.one_of(
        YAML_VALUES,
        st.sampled_from(sorted(KNOWN_KEYS)).flatmap(
            lambda section: st.dictionaries(st.sampled_from([*KNOWN_KEYS[section], "typo"]), YAML_VALUES, max_size=3)
        ),
    ),
    max_size=5,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=RANDOM_CONFIGS | st.text(max_size=80))
def test_validate_random_config_exits_0_or_2(data):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "c.yaml"
        text = data if isinstance(data, str) else yaml.safe_dump(data, allow_unicode=True)
        path.write_text(text, encoding="utf-8")
        result = invoke("validate", path)
    assert result.exit_code in (0, ExitCode.INVALID_INPUT), result.stderr
    if result.exit_code == ExitCode.INVALID_INPUT:
        assert len(result.stderr.splitlines()) == 1, result.stderr
        assert result.stderr.startswith("error: ")
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "changes, parts",
    [
        (
            {"prompt": {"length": 130}},
            ["c.yaml:2: prompt.length: a 130-token prompt", "leave no room for the target in the model's context of 128 tokens"],
        ),
        (
            {"objective": {"target": "hello world, " * 60}},
            ["c.yaml:5: objective.target: ", "exceed the model's context of 128 tokens", "shorten objective.target to at most"],
        ),
        (
            {"objective": {"target_ids": [5, 100_000]}},
            ["objective.target_ids[1]: token id 100000 is outside the model's vocabulary"],
        ),
        (
            {"objective": {"target": "<|endoftext|> and more"}},
            ["c.yaml:5: objective.target[0]: token id 0 ('<|endoftext|>') ends generation", "keep it only as the last token"],
        ),
    ],
    ids=["prompt-longer-than-context", "target-longer-than-context", "target-id-outside-vocabulary",
         "end-of-sequence-inside-target"],
)
def test_input_exceeding_model_rejected(tiny, tmp_path, changes, parts):
    config = base_config(**changes)
    if "target_ids" in changes.get("objective", {}):
        config["objective"] = {"target_ids": changes["objective"]["target_ids"]}
    path = write_config(tmp_path / "c.yaml", **config)
    result = invoke("optimize", path)
    assert_one_line_error(result, *parts)
    assert list((tmp_path / "runs").iterdir()) == []


def test_context_error_names_the_flag(tiny, tmp_path):
    path = write_config(tmp_path / "c.yaml", **base_config())
    result = invoke("optimize", path, "--set", "prompt.length=200")
    assert_one_line_error(result, "--set prompt.length=200: prompt.length: a 200-token prompt")


def test_template_without_placeholder_rejected(tiny, tmp_path):
    config = base_config(task={"examples": [{"input": "a", "output": "b"}], "template": "Input: {input}"})
    path = write_config(tmp_path / "c.yaml", **config)
    result = invoke("optimize", path)
    assert_one_line_error(result, "c.yaml:", "task.template: expected a template containing {prompt} exactly once")


@pytest.mark.parametrize(
    "name, text, parts",
    [
        ("ex.csv", "input,wrong\na,b\n", ["task.path", "ex.csv", "output"]),
        ("ex.jsonl", '{"input": "a", "output": "b"}\n{"input": "c"}\n', ["task.path", "ex.jsonl", "output"]),
        ("ex.jsonl", '{"input": "a", "output": "b"}\n{"input": "", "output": ""}\n', ["task.path", "ex.jsonl"]),
    ],
    ids=["csv-missing-column", "jsonl-missing-field", "jsonl-empty-row"],
)
def test_examples_file_with_bad_row_rejected(tiny, tmp_path, name, text, parts):
    (tmp_path / name).write_text(text)
    config = base_config(task={"path": name})
    path = write_config(tmp_path / "c.yaml", **config)
    result = invoke("optimize", path)
    assert_one_line_error(result, *parts)


# -- models, devices and output folders that do not exist or cannot be used --------------


@pytest.fixture
def offline_cache(monkeypatch, tmp_path):
    """Keep GGUF conversions and hub lookups inside the test's folder and off the network."""
    monkeypatch.setenv("SDLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


def test_missing_model_path_rejected(offline_cache, tmp_path):
    path = write_config(tmp_path / "c.yaml", **base_config(model={"spec": "models/absent.gguf", "device": "cpu"}))
    result = invoke("optimize", path)
    assert_one_line_error(result, "c.yaml:12: model.spec: model file or directory", "absent.gguf not found; check the path")
    assert list((tmp_path / "runs").iterdir()) == []


def test_missing_hub_model_rejected(offline_cache, tmp_path):
    path = write_config(tmp_path / "c.yaml", **base_config(model={"spec": "no-such-org/no-such-model", "device": "cpu"}))
    result = invoke("optimize", path)
    assert_one_line_error(result, "model.spec: model 'no-such-org/no-such-model' not found")


def test_truncated_gguf_rejected(offline_cache, tmp_path):
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + bytes(40))
    path = write_config(tmp_path / "c.yaml", **base_config(model={"spec": "broken.gguf", "device": "cpu"}))
    result = invoke("optimize", path)
    assert_one_line_error(result, "model.spec: cannot read GGUF file", "broken.gguf", "download or export it again")


@pytest.mark.skipif(IS_ROOT, reason="root reads files whatever their permissions")
def test_unreadable_gguf_rejected(offline_cache, tmp_path):
    gguf = tmp_path / "locked.gguf"
    gguf.write_bytes(b"GGUF" + bytes(40))
    gguf.chmod(0)
    path = write_config(tmp_path / "c.yaml", **base_config(model={"spec": "locked.gguf", "device": "cpu"}))
    result = invoke("optimize", path)
    assert_one_line_error(result, "model.spec: cannot read GGUF file", "check its permissions")


def test_absent_device_rejected(offline_cache, tmp_path):
    path = write_config(tmp_path / "c.yaml", **base_config())
    result = invoke("optimize", path, "--device", "cuda:99")
    assert_one_line_error(result, "--device cuda:99: model.device: device 'cuda:99' is not available on this machine")
    assert list((tmp_path / "runs").iterdir()) == []


def test_output_dir_that_is_a_file_rejected(tiny, tmp_path):
    (tmp_path / "runs").write_text("not a folder\n")
    path = write_config(tmp_path / "c.yaml", **base_config())
    result = invoke("optimize", path)
    assert_one_line_error(result, "c.yaml:10: output_dir", "is a file, not a directory; set output_dir to a folder")
    assert (tmp_path / "runs").read_text() == "not a folder\n"


def test_output_dir_below_a_file_rejected(tiny, tmp_path):
    (tmp_path / "file").write_text("")
    path = write_config(tmp_path / "c.yaml", **base_config())
    result = invoke("optimize", path, "--output-dir", tmp_path / "file" / "runs")
    assert_one_line_error(result, "--output-dir", "output_dir", "choose a writable output_dir")


@pytest.mark.skipif(IS_ROOT, reason="root writes into folders whatever their permissions")
def test_output_dir_not_writable_rejected(tiny, tmp_path):
    (tmp_path / "runs").mkdir(mode=0o500)
    path = write_config(tmp_path / "c.yaml", **base_config())
    result = invoke("optimize", path)
    assert_one_line_error(result, "cannot write to run directory", "choose a writable output_dir")


def test_existing_run_name_names_key(tiny, tmp_path):
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    path = write_config(tmp_path / "c.yaml", **base_config(run_name="taken"))
    result = invoke("optimize", path)
    assert_one_line_error(result, "c.yaml:11: run_name", "already exists; pass --force")


def test_trust_remote_code_is_announced(tiny, tmp_path):
    path = write_config(tmp_path / "c.yaml", **base_config(model={"trust_remote_code": True}))
    result = invoke("optimize", path, "--quiet")
    assert result.exit_code == ExitCode.OBJECTIVE_NOT_MET, result.stderr
    assert "warning: model.trust_remote_code is true" in result.stderr


# -- text that must work ----------------------------------------------------------------


@pytest.mark.parametrize(
    "field, text",
    [
        ("target", "and more<|endoftext|>"),
        ("target", "smile 😀 please"),
        ("target", "   leading spaces"),
        ("target", "\n\nThe end.\n"),
        ("init_text", " 😀\n<|endoftext|>"),
        ("prefix", "\n\n"),
        ("suffix", " <|endoftext|>"),
    ],
    ids=["target-special-token", "target-emoji", "target-leading-spaces", "target-newlines",
         "init-text-mixed", "prefix-newlines", "suffix-special-token"],
)
def test_unusual_text_works(tiny, tmp_path, field, text):
    section = "objective" if field == "target" else "prompt"
    config = base_config(**{section: {field: text}}, run_name="r")
    path = write_config(tmp_path / "c.yaml", **config)
    result = invoke("optimize", path, "--json")
    assert result.exit_code in (ExitCode.OBJECTIVE_MET, ExitCode.OBJECTIVE_NOT_MET), result.stderr
    assert error_lines(result.stderr) == []
    resolved = yaml.safe_load((tmp_path / "runs" / "r" / "config.yaml").read_text())
    assert resolved[section][field] == text
    end = json.loads(result.stdout.splitlines()[-1])
    assert end["event"] == "end"


# -- signals and resume ------------------------------------------------------------------


def long_run_config(tmp_path: Path, **eval_changes) -> Path:
    return write_config(
        tmp_path / "long.yaml",
        prompt={"length": 6, "samples": 1},
        objective={"target": UNREACHED_TARGET},
        optimizer={"steps": 1_000_000},
        eval={"every": 5, "stop_on_success": False, **eval_changes},
        output_dir=str(tmp_path / "runs"),
        run_name="long",
    )


def wait_for_steps(process, run_dir: Path, steps: int) -> None:
    """Wait until metrics.jsonl has `steps` rows, which is after the signal handlers are installed."""
    deadline = time.monotonic() + 120
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().count("\n") >= steps):
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, "the run did not start within 120 s"
        time.sleep(0.05)


def assert_run_files_intact(run_dir: Path) -> None:
    for name in ("best_prompt.json", "checkpoint.json", "prompt.safetensors.json", "summary.json"):
        if (run_dir / name).exists():
            json.loads((run_dir / name).read_text())
    for tensors in run_dir.glob("*.safetensors"):
        load_file(str(tensors))
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    for line in lines[:-1]:
        json.loads(line)


def test_sigterm_stops_saves_and_exits_143(tmp_path):
    config = long_run_config(tmp_path)
    run_dir = tmp_path / "runs" / "long"
    process = tiny_cli_process("optimize", str(config))
    try:
        wait_for_steps(process, run_dir, 3)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()

    assert process.returncode == ExitCode.TERMINATED, stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["reason"] == "interrupted"
    checkpoint = json.loads((run_dir / "checkpoint.json").read_text())
    assert checkpoint["state"]["step"] == summary["steps"]
    assert (run_dir / checkpoint["tensors"]).exists()
    assert f"checkpoint to {run_dir / 'checkpoint.json'}" in stderr
    assert f"sdlm optimize --resume {run_dir}" in stderr
    assert_run_files_intact(run_dir)


def test_second_sigint_keeps_files_intact(tmp_path):
    config = long_run_config(tmp_path, checkpoint_every=1)
    run_dir = tmp_path / "runs" / "long"
    process = tiny_cli_process("optimize", str(config))
    try:
        wait_for_steps(process, run_dir, 5)
        process.send_signal(signal.SIGINT)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()

    assert process.returncode == ExitCode.INTERRUPTED, stderr
    assert len(error_lines(stderr)) <= 1
    assert "Traceback" not in stderr
    assert_run_files_intact(run_dir)


def test_sigkill_leaves_resumable_run(tmp_path):
    config = long_run_config(tmp_path, checkpoint_every=2)
    run_dir = tmp_path / "runs" / "long"
    process = tiny_cli_process("optimize", str(config))
    try:
        wait_for_steps(process, run_dir, 7)
        process.kill()
        process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()

    assert_run_files_intact(run_dir)
    checkpoint_step = json.loads((run_dir / "checkpoint.json").read_text())["state"]["step"]
    assert checkpoint_step >= 6
    assert checkpoint_step % 2 == 0

    # The resumed run drops the rows after the checkpoint and runs 3 more steps.
    resumed = tiny_cli_process("optimize", "--resume", str(run_dir), "--steps", str(checkpoint_step + 3), "-q")
    _, stderr = resumed.communicate(timeout=120)
    assert resumed.returncode == ExitCode.OBJECTIVE_NOT_MET, stderr
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, checkpoint_step + 4))


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, ExitCode.TERMINATED), (signal.SIGINT, ExitCode.INTERRUPTED)], ids=["sigterm", "sigint"])
def test_signal_while_loading_exits_at_once(tmp_path, signum, code):
    config = long_run_config(tmp_path)
    process = tiny_cli_process("optimize", str(config), env_extra={"SDLM_TEST_LOAD_SECONDS": "60"})
    try:
        # The "loading model" line comes after the handlers are installed.
        assert process.stderr.readline().startswith("loading model")
        started = time.monotonic()
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()

    assert process.returncode == code, stderr
    assert time.monotonic() - started < 20
    assert error_lines(stderr) == ["error: interrupted while loading the model, before the first step"]
    assert list((tmp_path / "runs").iterdir()) == []


def test_resume_continues_run_through_cli(tiny, tmp_path):
    straight = write_config(tmp_path / "straight.yaml", **base_config(optimizer={"steps": 9}, run_name="straight"))
    assert invoke("optimize", straight, "-q").exit_code == ExitCode.OBJECTIVE_NOT_MET

    config = write_config(tmp_path / "c.yaml", **base_config(optimizer={"steps": 9}, run_name="split"))
    first = invoke("optimize", config, "-q", "--steps", "4")
    assert first.exit_code == ExitCode.OBJECTIVE_NOT_MET, first.stderr
    run_dir = tmp_path / "runs" / "split"
    assert json.loads((run_dir / "checkpoint.json").read_text())["state"]["step"] == 4

    resumed = invoke("optimize", "--resume", run_dir, "--steps", "9", "-q")
    assert resumed.exit_code == ExitCode.OBJECTIVE_NOT_MET, resumed.stderr

    def losses(name: str) -> list[float]:
        lines = (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in lines]

    assert losses("split") == losses("straight")
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 9
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["optimizer"]["steps"] == 9


@pytest.mark.parametrize(
    "args, parts",
    [
        (("--resume", "{run}", "--seed", "3"), ["--seed cannot be combined with --resume"]),
        (("--resume", "{run}", "--set", "optimizer.lr=1"), ["--set and --force cannot be combined with --resume"]),
        (("{config}", "--resume", "{run}"), ["give either CONFIG or --resume"]),
        (("--resume", "{empty}"), ["no config.yaml there"]),
        ((), ["missing CONFIG"]),
    ],
    ids=["seed-flag", "set-flag", "config-and-resume", "not-a-run", "nothing"],
)
def test_resume_rejects_bad_arguments(tiny, tmp_path, args, parts):
    config = write_config(tmp_path / "c.yaml", **base_config(run_name="r"))
    assert invoke("optimize", config, "-q").exit_code == ExitCode.OBJECTIVE_NOT_MET
    (tmp_path / "empty").mkdir()
    names = {"run": tmp_path / "runs" / "r", "config": config, "empty": tmp_path / "empty"}
    result = invoke("optimize", *(arg.format(**names) for arg in args))
    assert_one_line_error(result, *parts)


@pytest.mark.parametrize("steps", [("--steps", "3"), ("--steps", "4"), ()], ids=["fewer", "same", "unchanged"])
def test_resume_with_no_step_left_rejected(tiny, tmp_path, steps):
    config = write_config(tmp_path / "c.yaml", **base_config(optimizer={"steps": 4}, run_name="r"))
    assert invoke("optimize", config, "-q").exit_code == ExitCode.OBJECTIVE_NOT_MET
    run_dir = tmp_path / "runs" / "r"
    saved = (run_dir / "config.yaml").read_text()

    result = invoke("optimize", "--resume", run_dir, *steps)

    assert_one_line_error(result, "the checkpoint is at step 4", "give --steps above 4")
    assert (run_dir / "config.yaml").read_text() == saved


def test_resume_without_checkpoint_rejected(tiny, tmp_path):
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    write_config(run_dir / "config.yaml", **base_config())
    result = invoke("optimize", "--resume", run_dir)
    assert_one_line_error(result, "checkpoint.json not found", "eval.checkpoint_every")
