"""`sdlm generate`: differentiable generation from the command line."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from sdlm.cli_support import CommandError, cli_logging, logger, reported_errors
from sdlm.config import EMBEDDED_MODEL



# -- generate ----------------------------------------------------------------------------


def _read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    if (prompt is None) == (prompt_file is None):
        raise CommandError("give exactly one of --prompt TEXT and --prompt-file FILE")
    if prompt is not None:
        return prompt
    try:
        text = prompt_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        line = error.object[: error.start].count(b"\n") + 1
        raise CommandError(
            f"--prompt-file {prompt_file}: line {line}: byte {error.object[error.start]:#04x} is not UTF-8 text "
            "(save the file as UTF-8)"
        ) from None
    except OSError as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise CommandError(f"cannot read --prompt-file {prompt_file}: {reason}") from None
    # Files usually end with one line break that is not part of the prompt.
    return text[:-1] if text.endswith("\n") else text


def generate(
    model_spec: Annotated[
        str, typer.Option("--model", help="Model: smollm2 (embedded), a model directory, a .gguf file or a cached hub id.")
    ] = EMBEDDED_MODEL,
    prompt: Annotated[Optional[str], typer.Option(help="Prompt text, encoded with no special tokens.")] = None,
    prompt_file: Annotated[
        Optional[Path], typer.Option(help="File with the prompt text. One final line break is dropped.")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Number of tokens to generate.")] = 20,
    temperature: Annotated[
        float, typer.Option(min=0, help="STGS relaxation temperature of the soft samples fed back with --soft.")
    ] = 1.0,
    noise_scale: Annotated[
        Optional[float],
        typer.Option(min=0, help="Gumbel noise multiplier: tokens are drawn as if from softmax(logits / noise_scale). Default 1."),
    ] = None,
    hard: Annotated[
        Optional[bool], typer.Option("--hard/--soft", help="Feed back one-hot tokens (default) or the soft samples.")
    ] = None,
    greedy: Annotated[bool, typer.Option("--greedy", help="Pick the most likely token each step (noise scale 0), as HF greedy decoding.")] = False,
    seed: Annotated[Optional[int], typer.Option(min=0, help="Seed of the Gumbel noise. Without it, each run draws new noise.")] = None,
    num_samples: Annotated[int, typer.Option(min=1, help="Number of samples generated as one batch.")] = 1,
    device: Annotated[str, typer.Option(help="Device: auto, cpu, cuda, cuda:N or mps.")] = "auto",
    dtype: Annotated[str, typer.Option(help="Weight type: float32, bfloat16 or float16.")] = "float32",
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Allow a hub model to run its own code while loading.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object with the prompt and the samples.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Log debug messages and print tracebacks.")] = False,
) -> None:
    """Generate continuations of a prompt through STGS sampling, as the optimizer runs the model.

    Generation stops at the end-of-sequence token. Samples go to stdout, separated by header
    lines when there are several.
    """
    with reported_errors(debug):
        text = _read_prompt(prompt, prompt_file)
        if not 0 < temperature < math.inf:
            raise CommandError(f"--temperature must be a finite number > 0, got {temperature} (such as 1)")
        if noise_scale is not None and not math.isfinite(noise_scale):
            raise CommandError(f"--noise-scale must be a finite number >= 0, got {noise_scale} (such as 1)")
        if greedy and hard is False:
            raise CommandError("--greedy cannot be combined with --soft, because greedy decoding feeds back hard tokens")
        if greedy and noise_scale not in (None, 0):
            raise CommandError(f"--greedy sets the noise scale to 0, so it cannot be combined with --noise-scale {noise_scale:g}; drop one")
        noise_scale = 1.0 if noise_scale is None else noise_scale
        with cli_logging(logging.DEBUG if debug else logging.WARNING):
            if trust_remote_code:
                logger.warning("--trust-remote-code is on: %s may run its own Python code while loading", model_spec)
            samples, prompt_ids = _generate(
                text, model_spec, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                max_new_tokens=max_new_tokens, temperature=temperature, hard=hard is not False,
                noise_scale=0.0 if greedy else noise_scale, seed=seed, num_samples=num_samples,
            )

    if as_json:
        print(json.dumps({"model": model_spec, "prompt": text, "prompt_ids": prompt_ids, "samples": samples}, ensure_ascii=False))
        return
    for index, sample in enumerate(samples, start=1):
        if len(samples) > 1:
            print(f"=== sample {index} of {len(samples)} ===")
        print(sample["text"])


def _generate(
    text: str, model_spec: str, *, device: str, dtype: str, trust_remote_code: bool, max_new_tokens: int,
    temperature: float, hard: bool, noise_scale: float, seed: int | None, num_samples: int,
) -> tuple[list[dict], list[int]]:
    """Load the model and generate. Returns the samples ({"text", "ids"}) and the prompt ids."""
    import torch

    import sdlm.models as models_module
    from sdlm.guards import model_context_length
    from sdlm.stgs import STGS
    from sdlm.stgs_diff_model import STGSDiffModel

    hf_model, tokenizer = models_module.load_model(model_spec, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    model = STGSDiffModel(hf_model, tokenizer, stgs=STGS(temperature=temperature, hard=hard, noise_scale=noise_scale))
    prompt_ids = model.encode(text)  # (1, T)
    if prompt_ids.shape[1] == 0:
        raise CommandError("the prompt is empty (give at least one token of text)")
    context = model_context_length(model)
    if context is not None and prompt_ids.shape[1] + max_new_tokens > context:
        room = context - prompt_ids.shape[1]
        fix = f"lower --max-new-tokens to at most {room}" if room > 0 else "shorten the prompt"
        raise CommandError(
            f"the prompt ({prompt_ids.shape[1]} tokens) and --max-new-tokens {max_new_tokens} exceed the "
            f"model's context of {context} tokens ({fix})"
        )

    generator = torch.Generator(device=model.device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            parts=[prompt_ids.expand(num_samples, -1)], max_new_tokens=max_new_tokens,
            stop_at_eos=True, generator=generator,
        )
    samples = [
        {"text": sample_text, "ids": row[: int(length)].tolist()}
        for sample_text, row, length in zip(out.text, out.ids, out.lengths)
    ]
    return samples, prompt_ids[0].tolist()


