"""A learnable string: one distribution over the vocabulary at each prompt position.

Shapes: `S` Gumbel samples, `L` string length, `V` vocabulary (the model's embedding rows, which
may be more than the tokenizer's tokens; the extra rows are always masked out).

Example:
    >>> s = STGSDiffString(tokenizer, init_text="Hello world")   # doctest: +SKIP
    >>> draw = s.sample(4)            # draw.y: (4, L, V), draw.ids: (4, L)
    >>> s.text                        # the most likely string now
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Literal, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sdlm.stgs import STGS, STGSOutput

VocabMask = Literal["none", "no_special", "printable", "ascii", "roundtrip"]
VOCAB_MASKS = ("none", "no_special", "printable", "ascii", "roundtrip")

# STGS settings stored with a saved string, so `load` rebuilds the same sampler.
_STGS_SETTINGS = (
    "learnable_temperature", "min_temperature", "max_temperature", "hard", "hard_method",
    "normalize", "noise_scale", "distance",
)


def build_vocab_mask(tokenizer, kind: VocabMask | Sequence[int] | torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Return a (V,) bool mask of the tokens a prompt may use.

    kind: "none" (every token the tokenizer has), "no_special" (also drop special tokens),
    "printable" (also drop tokens whose decoded text is empty or not printable; spaces and
    newlines count as printable), "ascii" (printable and ASCII only), "roundtrip" (printable
    tokens that re-encode to themselves alone), a list of allowed ids, or a (V,) bool tensor.
    Embedding rows beyond the tokenizer's vocabulary are always excluded.
    """
    if isinstance(kind, torch.Tensor):
        if kind.shape != (vocab_size,) or kind.dtype != torch.bool:
            raise ValueError(f"a vocabulary mask tensor must be bool with shape ({vocab_size},), got {kind.dtype} {tuple(kind.shape)}")
        return kind.clone()
    tokenizer_size = min(len(tokenizer), vocab_size)
    if not isinstance(kind, str):
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        ids = torch.as_tensor(list(kind), dtype=torch.long)
        if ids.numel() and (ids.min() < 0 or ids.max() >= tokenizer_size):
            raise ValueError(f"allowed token ids must lie in [0, {tokenizer_size}), got {kind!r}")
        mask[ids] = True
        return mask
    if kind not in VOCAB_MASKS:
        raise ValueError(f"vocab_mask must be one of {', '.join(VOCAB_MASKS)}; got {kind!r}")

    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[:tokenizer_size] = True
    if kind == "none":
        return mask
    special = [i for i in tokenizer.all_special_ids if i is not None and i < vocab_size]
    mask[special] = False
    if kind == "no_special":
        return mask

    texts = _decoded_tokens(tokenizer, tokenizer_size)
    for token_id, text in enumerate(texts):
        if not mask[token_id]:
            continue
        keep = text != "" and text.replace("\n", " ").replace("\t", " ").isprintable()
        if keep and kind == "ascii":
            keep = text.isascii()
        if keep and kind == "roundtrip":
            keep = tokenizer.encode(text, add_special_tokens=False) == [token_id]
        mask[token_id] = keep
    return mask


def banned_token_mask(tokenizer, vocab_size: int, texts: Sequence[str] = (), ids: Sequence[int] = ()) -> torch.Tensor:
    """Return a (V,) bool mask, True for each token in `ids` or whose decoded text contains one of `texts`.

    NOTE: this bans single tokens only, so a prompt can still spell a banned text across tokens.
    """
    banned = torch.zeros(vocab_size, dtype=torch.bool)
    ids = list(ids)
    if ids:
        if min(ids) < 0 or max(ids) >= vocab_size:
            raise ValueError(f"banned token ids must lie in [0, {vocab_size}), got {ids!r}")
        banned[torch.as_tensor(ids, dtype=torch.long)] = True
    if texts:
        size = min(len(tokenizer), vocab_size)
        for token_id, text in enumerate(_decoded_tokens(tokenizer, size)):
            if any(t in text for t in texts):
                banned[token_id] = True
    return banned


@lru_cache(maxsize=4)
def _decoded_tokens(tokenizer, size: int) -> list[str]:
    # One batch_decode call is far faster than decoding 50k tokens one by one.
    return tokenizer.batch_decode([[i] for i in range(size)], clean_up_tokenization_spaces=False)


class STGSDiffString(nn.Module):
    """A learnable prompt: logits (1, L, V) sampled into tokens by an `STGS` module.

    Initialise from `init_text`, from `init_ids`, or at random with `length` positions. Text and
    id initialisations put `init_scale` on the chosen token and 0 elsewhere; random ones draw
    logits from N(0, init_scale^2). The vocabulary mask is applied to every sample and decode.
    """

    def __init__(
        self,
        tokenizer,
        *,
        length: int | None = None,
        init_text: str | None = None,
        init_ids: Sequence[int] | torch.Tensor | None = None,
        init_scale: float = 1.0,
        vocab_size: int | None = None,
        vocab_mask: VocabMask | Sequence[int] | torch.Tensor = "no_special",
        stgs: STGS | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        given = [x is not None for x in (length, init_text, init_ids)]
        if sum(given) != 1:
            raise ValueError("give exactly one of length, init_text or init_ids")
        if not init_scale > 0:
            raise ValueError(f"init_scale must be > 0, got {init_scale!r}")
        self.tokenizer = tokenizer
        self.vocab_size = int(vocab_size or len(tokenizer))
        self.init_scale = float(init_scale)
        self.register_buffer("vocab_mask", build_vocab_mask(tokenizer, vocab_mask, self.vocab_size))
        if not self.vocab_mask.any():
            raise ValueError(f"vocab_mask {vocab_mask!r} allows no token")
        self.stgs = stgs if stgs is not None else STGS()
        # Optional (L, V) bool mask of per-position constraints, combined with vocab_mask.
        self.register_buffer("position_mask", None)

        if init_text is not None:
            init_ids = tokenizer.encode(init_text, add_special_tokens=False)
            if not init_ids:
                raise ValueError(f"init_text {init_text!r} encodes to no tokens; give non-empty text or a length")
        # The ids of a text or id initialisation, which reinitialize() returns to.
        self.init_ids: list[int] | None = None
        if init_ids is not None:
            init_ids = torch.as_tensor(init_ids, dtype=torch.long).reshape(-1)
            if init_ids.numel() == 0 or init_ids.min() < 0 or init_ids.max() >= self.vocab_size:
                raise ValueError(f"init_ids must be a non-empty list of ids in [0, {self.vocab_size})")
            logits = self._text_logits(init_ids)
            self.init_ids = init_ids.tolist()
        else:
            if int(length) < 1:
                raise ValueError(f"length must be >= 1, got {length!r}")
            logits = self._random_logits(int(length), generator)
        self.logits = nn.Parameter(logits.unsqueeze(0))  # (1, L, V)

    # -- initial logits --------------------------------------------------------------------

    def _text_logits(self, ids: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(ids.numel(), self.vocab_size)
        logits[torch.arange(ids.numel()), ids] = self.init_scale
        return logits  # (L, V)

    def _random_logits(self, length: int, generator: torch.Generator | None = None) -> torch.Tensor:
        # Drawn on the generator's device and returned on the CPU.
        # NOTE: no test covers a CUDA generator here, because the test machines have no GPU.
        device = generator.device if generator is not None else None
        return (torch.randn(length, self.vocab_size, generator=generator, device=device) * self.init_scale).cpu()  # (L, V)

    # -- sampling and decoding -------------------------------------------------------------

    @property
    def length(self) -> int:
        return self.logits.shape[1]

    def sample(
        self,
        n: int = 1,
        *,
        generator: torch.Generator | None = None,
        hidden_states: torch.Tensor | None = None,
        **overrides,
    ) -> STGSOutput:
        """Draw n STGS samples at once: y (n, L, V) and ids (n, L).

        overrides: per-call STGS settings (temperature, hard, noise_scale).
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        logits = self.logits.expand(n, -1, -1)  # (1, L, V) -> (n, L, V), no copy
        return self.stgs(logits, hidden_states=hidden_states, mask=self.allowed_mask, generator=generator, **overrides)

    @property
    def allowed_mask(self) -> torch.Tensor:
        """The tokens each position may use: vocab_mask (V,), or with position constraints (L, V)."""
        if self.position_mask is None:
            return self.vocab_mask
        return self.vocab_mask & self.position_mask

    def constrain(self, position_mask: torch.Tensor | None) -> None:
        """Limit each position to the tokens allowed in position_mask (L, V), or lift limits with None.

        Raises ValueError when the shape is wrong or a position is left with no allowed token.
        """
        if position_mask is None:
            self.position_mask = None
            return
        if tuple(position_mask.shape) != (self.length, self.vocab_size) or position_mask.dtype != torch.bool:
            raise ValueError(
                f"a position mask must be bool with shape ({self.length}, {self.vocab_size}), "
                f"got {position_mask.dtype} {tuple(position_mask.shape)}"
            )
        position_mask = position_mask.to(self.vocab_mask.device)
        empty = (~(position_mask & self.vocab_mask).any(-1)).nonzero().view(-1).tolist()
        if empty:
            raise ValueError(f"positions {empty} have no token allowed by both the constraints and vocab_mask")
        self.position_mask = position_mask.clone()

    @property
    def ids(self) -> torch.Tensor:
        """The most likely allowed token at each position, (L,)."""
        masked = self.logits.detach()[0].masked_fill(~self.allowed_mask, float("-inf"))
        return masked.argmax(dim=-1)

    @property
    def text(self) -> str:
        return self.decode(self.ids)

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str | list[str]:
        """Decode ids (L,) to a string, or (S, L) to a list of strings, keeping spaces as they are."""
        ids = torch.as_tensor(ids)
        if ids.dim() == 2:
            return [self.decode(row) for row in ids]
        return self.tokenizer.decode(ids.tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    @torch.no_grad()
    def reinitialize(
        self, generator: torch.Generator | None = None, *, around: Sequence[int] | None = None, bias: float = 0.0
    ) -> None:
        """Reset the logits in place and keep the Parameter.

        A string made from text or ids, at its initial length, goes back to them. Any other
        string gets fresh N(0, init_scale^2) logits. `around` (one id per position) then gets
        `bias` added to its tokens' logits, so sampling starts near that prompt.
        """
        if self.init_ids is not None and len(self.init_ids) == self.length:
            fresh = self._text_logits(torch.tensor(self.init_ids))
        else:
            fresh = self._random_logits(self.length, generator)  # (L, V)
        if around is not None and bias:
            ids = torch.as_tensor(list(around), dtype=torch.long)
            if ids.numel() != self.length:
                raise ValueError(f"around must have one id per position ({self.length}), got {ids.numel()}")
            if not bool(((ids >= 0) & (ids < self.vocab_size)).all()):
                raise ValueError(f"around has ids outside the vocabulary [0, {self.vocab_size}): {ids.tolist()}")
            fresh[torch.arange(self.length), ids] += bias
        self.logits.copy_(fresh.to(self.logits.device, self.logits.dtype).unsqueeze(0))

    # -- length changes --------------------------------------------------------------------

    def insert(self, position: int, count: int = 1, *, text: str | None = None) -> None:
        """Insert positions before `position`: `count` random ones, or the tokens of `text`."""
        if not 0 <= position <= self.length:
            raise ValueError(f"position must be in [0, {self.length}], got {position}")
        if text is not None:
            ids = torch.as_tensor(self.tokenizer.encode(text, add_special_tokens=False), dtype=torch.long)
            new = self._text_logits(ids)
        else:
            if count < 1:
                raise ValueError(f"count must be >= 1, got {count}")
            new = self._random_logits(count)
        new = new.to(self.logits.device, self.logits.dtype).unsqueeze(0)
        old = self.logits.detach()
        self._set_logits(torch.cat([old[:, :position], new, old[:, position:]], dim=1))

    def delete(self, position: int, count: int = 1) -> None:
        """Delete `count` positions starting at `position`; at least one position must remain."""
        if count < 1 or not 0 <= position or position + count > self.length:
            raise ValueError(f"cannot delete {count} positions at {position} from a string of length {self.length}")
        if count >= self.length:
            raise ValueError("cannot delete every position of the string")
        old = self.logits.detach()
        self._set_logits(torch.cat([old[:, :position], old[:, position + count:]], dim=1))

    def resize(self, length: int) -> None:
        """Truncate or extend (with random positions at the end) to `length` positions."""
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        if length < self.length:
            self.delete(length, self.length - length)
        elif length > self.length:
            self.insert(self.length, length - self.length)

    def _set_logits(self, logits: torch.Tensor) -> None:
        if self.position_mask is not None:
            raise ValueError("length changes are not supported with per-position constraints; call constrain(None) first")
        if self.stgs.learnable_temperature == "per_position":
            raise ValueError("length changes are not supported with a per-position learnable temperature")
        # NOTE: a new Parameter object: an optimizer holding the old one must be rebuilt.
        self.logits = nn.Parameter(logits.contiguous())

    # -- persistence -----------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write `path` (safetensors: logits, mask, STGS state) and `path` + ".json" (metadata)."""
        path = Path(path)
        tensors = {"logits": self.logits.detach().cpu().contiguous(), "vocab_mask": self.vocab_mask.cpu()}
        if self.position_mask is not None:
            tensors["position_mask"] = self.position_mask.cpu().contiguous()
        for name, value in self.stgs.state_dict().items():
            tensors[f"stgs.{name}"] = value.detach().cpu().contiguous()
        metadata = {
            "tokenizer": getattr(self.tokenizer, "name_or_path", None),
            "length": self.length,
            "vocab_size": self.vocab_size,
            "init_scale": self.init_scale,
            "text": self.text,
            "ids": self.ids.tolist(),
            "stgs": {name: getattr(self.stgs, name) for name in _STGS_SETTINGS}
            | {"temperature": float(self.stgs.initial_temperature), "hidden_size": self._stgs_hidden_size()},
        }
        _atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))
        _atomic_write(Path(f"{path}.json"), lambda tmp: tmp.write_text(json.dumps(metadata, indent=2) + "\n"))

    def _stgs_hidden_size(self) -> int | None:
        head = getattr(self.stgs, "temperature_head", None)
        return None if head is None else head.in_features

    @classmethod
    def load(cls, path: str | Path, tokenizer) -> "STGSDiffString":
        """Rebuild a string saved with `save`; `tokenizer` must be the one it was made with."""
        path = Path(path)
        metadata = json.loads(Path(f"{path}.json").read_text())
        tensors = load_file(str(path))
        settings = dict(metadata["stgs"])
        stgs = STGS(
            temperature=settings.pop("temperature"),
            length=metadata["length"],
            hidden_size=settings.pop("hidden_size", None),
            **settings,
        )
        string = cls(
            tokenizer,
            length=metadata["length"],
            init_scale=metadata["init_scale"],
            vocab_size=metadata["vocab_size"],
            vocab_mask=tensors["vocab_mask"],
            stgs=stgs,
        )
        with torch.no_grad():
            string.logits.copy_(tensors["logits"])
        stgs.load_state_dict({k.removeprefix("stgs."): v for k, v in tensors.items() if k.startswith("stgs.")})
        if "position_mask" in tensors:
            string.constrain(tensors["position_mask"])
        return string


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename it over `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    tmp.replace(path)
