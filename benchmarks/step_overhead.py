"""Measure the embedded model's load times and the cost of one optimization step.

Prints:
  - the cold load time (a fresh, temporary SDLM_CACHE_DIR, so the GGUF file is converted) and
    the cached load time (the user's cache, converted on an earlier run);
  - one step through STGS + one-hot embedding + model forward/backward + Adam, against the
    model's bare forward + backward on the same token ids (embeddings that require a gradient,
    no STGS, no one-hot products), as a ratio. Medians over --repeats runs after a warm-up.
  - with --check, the target's greedy check of the argmax prompt, which eval.every schedules (a
    run also scores the prompt's perplexity there), in full steps;
  - with --compile, the full step and the bare pass again with the model compiled by
    torch.compile (model.compile, which `sdlm bench` turns on), after a warm-up that compiles;
  - with --chat, the prompt sits in the chat template as the user message, as in
    configs/chat.yaml, and the full step is also timed with the template's fixed text before
    the prompt recomputed at every step instead of taken from its KV cache.

Usage:
    python benchmarks/step_overhead.py [--samples 4] [--prompt-length 10] [--target-length 10]
        [--repeats 10] [--skip-cold] [--compare-matmul] [--check] [--compile] [--chat] [--profile]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time


def time_load(cache_dir: str | None) -> float:
    """Time load_model("smollm2") in a fresh interpreter, so nothing is reused from memory."""
    env = dict(os.environ)
    if cache_dir is not None:
        env["SDLM_CACHE_DIR"] = cache_dir
    code = (
        "import time; t = time.perf_counter(); from sdlm.models import load_model; "
        "load_model('smollm2', device='cpu'); print(time.perf_counter() - t)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1, help="Gumbel samples per step (the batch size; the config default is 1)")
    parser.add_argument("--prompt-length", type=int, default=10, help="learnable prompt tokens")
    parser.add_argument("--target-length", type=int, default=10, help="target tokens, teacher-forced")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs of each variant")
    parser.add_argument("--skip-cold", action="store_true", help="skip the cold load (it converts the GGUF file, ~20 s)")
    parser.add_argument("--compare-matmul", action="store_true", help="also time the full step with the one-hot matmul in place of the row lookup")
    parser.add_argument("--check", action="store_true", help="also time one greedy check of the argmax prompt")
    parser.add_argument("--chat", action="store_true", help="put the prompt in the chat template as the user message, and time the step without the prefix cache too")
    parser.add_argument("--compile", action="store_true", help="also time the full step and the bare pass with the model compiled by torch.compile")
    parser.add_argument("--profile", action="store_true", help="also print the torch profiler's top operators for one step")
    args = parser.parse_args()
    if args.compile and args.chat:
        parser.error("--compile and --chat do not go together: passes after the cached chat prefix run eagerly")

    import torch

    from sdlm import STGS, STGSDiffModel, STGSDiffString
    from sdlm.bench import machine_info
    from sdlm.chat import chat_frame
    from sdlm.models import load_model
    from sdlm.objectives import TargetObjective

    print(f"machine: {machine_info()}")
    if not args.skip_cold:
        with tempfile.TemporaryDirectory() as cache_dir:
            print(f"cold load (empty SDLM_CACHE_DIR): {time_load(cache_dir):.1f} s")
    print(f"cached load: {time_load(None):.1f} s")

    model, tokenizer = load_model("smollm2", device="cpu")
    dm = STGSDiffModel(model, tokenizer)
    S, L, T = args.samples, args.prompt_length, args.target_length
    generator = torch.Generator().manual_seed(0)
    string = STGSDiffString(tokenizer, length=L, vocab_size=dm.vocab_size, stgs=STGS(), generator=generator)
    target_ids = torch.randint(0, len(tokenizer), (T,), generator=generator).tolist()
    prefix, suffix = chat_frame(tokenizer, "user" if args.chat else "none")
    objective = TargetObjective(dm, target_ids, prefix=prefix, suffix=suffix)
    P, Q = objective.prefix_ids.shape[1], objective.suffix_ids.shape[1]
    optimizer = torch.optim.Adam(string.parameters(), lr=0.3)

    def step_with(scorer: TargetObjective) -> None:
        draw = string.sample(S, generator=generator)
        loss = scorer.loss(draw.y).per_sample.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def full_step() -> None:
        step_with(objective)

    def uncached_step() -> None:
        # The same step with the fixed text before the prompt run through the model every time.
        draw = string.sample(S, generator=generator)
        parts = [objective.prefix_ids, draw.y, objective.suffix_ids, objective.target_ids[:, :-1]]
        logits = dm(parts=parts, logits_to_keep=T).logits  # (S, T, V)
        loss = torch.nn.functional.cross_entropy(logits.reshape(S * T, -1), objective.target_ids.expand(S, T).reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    # The bare model on the same token ids, the same loss, and a gradient to the embeddings from
    # the prompt on (the fixed text before the prompt needs none).
    pieces = [string.ids.view(1, L), objective.suffix_ids, objective.target_ids[:, :-1]]
    ids = torch.cat([piece.expand(S, -1) for piece in pieces], dim=1)  # (S, L + Q + T - 1)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)  # (S, L + Q + T - 1, D)
    prefix_embeds = model.get_input_embeddings()(objective.prefix_ids.expand(S, -1)).detach()  # (S, P, D)

    def bare_with(run_model) -> None:
        inputs = torch.cat([prefix_embeds, embeds], dim=1)  # (S, P + L + Q + T - 1, D)
        logits = run_model(inputs_embeds=inputs, logits_to_keep=T).logits.float()  # (S, T, V)
        loss = torch.nn.functional.cross_entropy(logits.reshape(S * T, -1), objective.target_ids.expand(S, T).reshape(-1))
        embeds.grad = None
        loss.backward()

    def bare_step() -> None:
        bare_with(model)

    import sdlm.stgs_diff_model as diff_model_module

    lookup = diff_model_module.is_one_hot

    def matmul_step() -> None:
        # Report every input as soft, so embed takes the (S, L, V) @ (V, D) product.
        diff_model_module.is_one_hot = lambda vectors: False
        try:
            full_step()
        finally:
            diff_model_module.is_one_hot = lookup

    def check() -> None:
        objective.check(string.ids.tolist())

    if args.compile:
        compiled_dm = STGSDiffModel(model, tokenizer, compile=True)
        compiled_objective = TargetObjective(compiled_dm, target_ids, prefix=prefix, suffix=suffix)
        compiled_model = torch.compile(model)

        def compiled_full_step() -> None:
            step_with(compiled_objective)

        def compiled_bare_step() -> None:
            bare_with(compiled_model)

        start = time.perf_counter()
        compiled_full_step()
        compiled_bare_step()
        print(f"compile (both variants): {time.perf_counter() - start:.1f} s")

    # Interleave the variants so that load from other processes hits them alike.
    full, bare, matmul, uncached, checks, compiled_full, compiled_bare = [], [], [], [], [], [], []
    for _ in range(3):
        if args.compile:
            compiled_full.append(median_seconds(compiled_full_step, args.repeats))
            compiled_bare.append(median_seconds(compiled_bare_step, args.repeats))
        full.append(median_seconds(full_step, args.repeats))
        bare.append(median_seconds(bare_step, args.repeats))
        if args.compare_matmul:
            matmul.append(median_seconds(matmul_step, args.repeats))
        if args.chat:
            uncached.append(median_seconds(uncached_step, args.repeats))
        if args.check:
            checks.append(median_seconds(check, args.repeats))
    full_s, bare_s = statistics.median(full), statistics.median(bare)
    fixed = f" + {P} fixed before + {Q} fixed after" if args.chat else ""
    print(f"step, {S} samples, {L} prompt{fixed} + {T} target tokens, {torch.get_num_threads()} threads:")
    recomputed = " (fixed text before the prompt recomputed)" if args.chat else ""
    print(f"  bare model forward+backward: {bare_s * 1000:.0f} ms{recomputed}")
    print(f"  full STGS step:              {full_s * 1000:.0f} ms")
    print(f"  overhead ratio (full / bare): {full_s / bare_s:.2f}")
    if args.compare_matmul:
        matmul_s = statistics.median(matmul)
        print(f"  full step, one-hot matmul:   {matmul_s * 1000:.0f} ms (ratio to bare {matmul_s / bare_s:.2f})")
    if args.compile:
        cfull_s, cbare_s = statistics.median(compiled_full), statistics.median(compiled_bare)
        print(f"  compiled bare forward+backward: {cbare_s * 1000:.0f} ms (eager bare / compiled bare {bare_s / cbare_s:.2f})")
        print(f"  compiled full STGS step:        {cfull_s * 1000:.0f} ms (eager full / compiled full {full_s / cfull_s:.2f})")
        print(f"  overhead ratio, compiled (full / bare): {cfull_s / cbare_s:.2f}")
    if args.check:
        check_s = statistics.median(checks)
        print(f"  one greedy check:            {check_s * 1000:.0f} ms ({check_s / full_s:.1f} full steps)")
    if args.chat:
        uncached_s = statistics.median(uncached)
        print(f"  full step, prefix recomputed: {uncached_s * 1000:.0f} ms (ratio to bare {uncached_s / bare_s:.2f})")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            full_step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
