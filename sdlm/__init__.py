"""sdlm: optimize prompts of causal language models by gradient descent.

The prompt is a learnable distribution over the vocabulary at each position. Each step draws
hard tokens from it with the Straight-Through Gumbel-Softmax trick, feeds them through a frozen
model and scores the result, so the gradient reaches the prompt's logits.

    from sdlm import STGS, STGSDiffModel, STGSDiffString, load_model

The names below load on first use, so `import sdlm.config` (used by `sdlm validate`) does not
pay for importing torch and transformers.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "STGS": "sdlm.stgs",
    "STGSOutput": "sdlm.stgs",
    "STGSDiffString": "sdlm.stgs_diff_string",
    "STGSDiffModel": "sdlm.stgs_diff_model",
    "GenerateOutput": "sdlm.stgs_diff_model",
    "load_model": "sdlm.models",
    "Config": "sdlm.config",
    "load_config": "sdlm.config",
    "optimize": "sdlm.optimize",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sdlm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
