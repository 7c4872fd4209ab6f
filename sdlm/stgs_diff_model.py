"""A frozen HuggingFace causal LM that reads one-hot tokens and generates differentiably.

Shapes: `B` batch, `T` sequence, `N` new tokens, `V` embedding rows (vocabulary), `D` width.

Inputs are given as `parts`, concatenated along the sequence in order. Each part is one of:
  - a string: encoded without special tokens;
  - token ids, int64 (T,) or (B, T);
  - one-hot or soft token vectors, float (B, T, V): mapped through the embedding matrix;
  - embeddings, float (B, T, D).
Parts with batch 1 are broadcast to the largest batch, so fixed text wraps a batch of samples.

Example:
    >>> dm = STGSDiffModel(model, tokenizer)                     # doctest: +SKIP
    >>> out = dm.generate(parts=["The capital of France is"], max_new_tokens=5)
    >>> out.text, out.y.shape                                    # y: (1, 5, V), differentiable
"""

from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch._functorch import config as functorch_config
from transformers import DynamicCache

from sdlm.stgs import STGS

logger = logging.getLogger("sdlm")

Part = Union[str, torch.Tensor]


@dataclass
class ForwardOutput:
    """logits: (B, T', V) float32 for the last T' positions (T' = T unless `logits_to_keep`);
    loss: mean next-token cross-entropy over labels != -100, or None; past_key_values: the KV cache when requested."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    past_key_values: object | None = None


@dataclass
class PrefixCache:
    """The KV cache of fixed leading tokens, computed once without gradient, and their count P.

    `forward(prefix=...)` runs only the tokens after them, on a copy of the cache that is
    repeated to the batch, so the prefix is not recomputed at every step or for every sample.
    """

    cache: object
    length: int


@dataclass
class GenerateOutput:
    """ids: (B, N) generated ids (pad after EOS); y: (B, N, V) STGS samples with gradient, zero after EOS;
    logits: (B, N, V) float32 next-token logits; text: B decoded strings; lengths: (B,) tokens before padding."""

    ids: torch.Tensor
    y: torch.Tensor
    logits: torch.Tensor
    text: list[str]
    lengths: torch.Tensor


class STGSDiffModel(nn.Module):
    """Wrap a causal LM and its tokenizer: freeze it, embed one-hot tokens, generate through STGS.

    Every model parameter gets requires_grad=False; gradients flow only to the inputs (and to
    learnable STGS temperatures). `stgs` samples generated tokens; its default is a hard argmax
    STGS at temperature 1.

    compile: run the passes whose input needs a gradient (the optimizer's steps) through
    `torch.compile`. The first such pass compiles, which takes about a minute on a small CPU;
    later ones are about 10% faster on CPU. Passes without a gradient (checks, generation)
    and passes after a cached prefix stay eager. If compiling fails, the model logs a warning
    and runs eagerly from then on.
    """

    def __init__(self, model: nn.Module, tokenizer, stgs: STGS | None = None, *, compile: bool = False) -> None:
        super().__init__()
        model.requires_grad_(False)
        model.eval()
        self.model = model
        # Stored in a list so that nn.Module does not register the compiled wrapper as a
        # second copy of the model (its state_dict would then hold every weight twice).
        self._compiled: list[nn.Module] = [torch.compile(model)] if compile else []
        self.tokenizer = tokenizer
        self.stgs = stgs if stgs is not None else STGS()
        parameters = inspect.signature(model.forward).parameters
        self.keeps_logits = "logits_to_keep" in parameters  # the model can skip logits it need not compute
        # transformers' own models also take the kept positions as an index tensor, which helps
        # in 16 bits (see _run). Model code from a hub repository may accept only a count.
        self._transformers_model = type(model).__module__.startswith("transformers.")
        # transformers 5.x renamed `past_key_values` to `cache`; accept both spellings.
        self._cache_arg = "cache" if "cache" in parameters else "past_key_values"

    # -- properties ------------------------------------------------------------------------

    @property
    def embedding_weight(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight  # (V, D)

    @property
    def vocab_size(self) -> int:
        return self.embedding_weight.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.embedding_weight.shape[1]

    @property
    def device(self) -> torch.device:
        return self.embedding_weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding_weight.dtype

    @property
    def generation_eos_ids(self) -> list[int]:
        """Token ids at which HF generate stops: the generation config's eos_token_id, empty without one."""
        return _id_list(self._generation_eos)

    @property
    def eos_token_ids(self) -> list[int]:
        """Token ids that end a generation: the generation config's, else the tokenizer's eos."""
        eos = self._generation_eos
        return _id_list(self.tokenizer.eos_token_id if eos is None else eos)

    @property
    def _generation_eos(self):
        return getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = (self.eos_token_ids or [0])[0]
        return int(pad)

    # -- inputs ----------------------------------------------------------------------------

    def encode(self, text: str) -> torch.Tensor:
        """Token ids (1, T) of `text`, with no BOS or other special tokens added."""
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return torch.tensor([ids], dtype=torch.long, device=self.device)

    def embed(self, part: Part) -> torch.Tensor:
        """Map one part (see the module docstring) to embeddings (B, T, D) in the model's dtype."""
        if isinstance(part, str):
            part = self.encode(part)
        if not part.is_floating_point():
            ids = part if part.dim() == 2 else part.view(1, -1)
            return self.model.get_input_embeddings()(ids.to(self.device))
        if part.dim() != 3:
            raise ValueError(f"float inputs must be (batch, seq, vocab) or (batch, seq, dim), got {tuple(part.shape)}")
        V, D = self.embedding_weight.shape
        width = part.shape[-1]
        if width == V and V != D:
            return embed_token_vectors(part.to(self.device, self.dtype), self.embedding_weight)
        if width == D and V != D:
            return part.to(self.device, self.dtype)
        raise ValueError(f"float input width {width} matches neither the vocabulary ({V}) nor the embedding width ({D})")

    def assemble(
        self, parts: Sequence[Part], attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed and concatenate parts: embeddings (B, T, D) and an attention mask (B, T)."""
        embeds = [self.embed(p) for p in parts]
        embeds = [e for e in embeds if e.shape[1] > 0]
        if not embeds:
            raise ValueError("the input is empty: give at least one token")
        batch = max(e.shape[0] for e in embeds)
        for e in embeds:
            if e.shape[0] not in (1, batch):
                raise ValueError(f"parts have batch sizes {[e.shape[0] for e in embeds]}; each must be 1 or {batch}")
        inputs_embeds = torch.cat([e.expand(batch, -1, -1) for e in embeds], dim=1)  # (B, T, D)
        if attention_mask is None:
            attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=self.device)
        elif tuple(attention_mask.shape) != tuple(inputs_embeds.shape[:2]):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {tuple(inputs_embeds.shape[:2])}")
        return inputs_embeds, attention_mask.to(self.device)

    def _parts(self, parts, input_ids, one_hot, inputs_embeds) -> list[Part]:
        given = [x for x in (input_ids, one_hot, inputs_embeds) if x is not None]
        if parts is not None and given:
            raise ValueError("give either parts or one of input_ids / one_hot / inputs_embeds")
        if parts is None:
            if len(given) != 1:
                raise ValueError("give exactly one of parts, input_ids, one_hot or inputs_embeds")
            parts = given
        return list(parts)

    # -- forward ---------------------------------------------------------------------------

    def forward(
        self,
        parts: Sequence[Part] | None = None,
        *,
        input_ids: torch.Tensor | None = None,
        one_hot: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        use_cache: bool = False,
        prefix: PrefixCache | None = None,
    ) -> ForwardOutput:
        """Run the model on the assembled input.

        labels: (B, T) ids aligned with the input, -100 where not scored; the loss is the mean
        cross-entropy of predicting labels[:, t + 1] from position t. logits_to_keep: if > 0,
        compute logits only for the last that many positions (saves the output projection).
        prefix: a cache from `cache_prefix`, whose tokens come before the input; the logits,
        labels and attention_mask then cover the input alone.
        """
        embeds, mask = self.assemble(self._parts(parts, input_ids, one_hot, inputs_embeds), attention_mask)
        if prefix is None:
            out = self._run(embeds, mask, positions_from_mask(mask), None, logits_to_keep, use_cache)
        else:
            batch = embeds.shape[0]
            cache = copy.deepcopy(prefix.cache)  # the model appends to the cache it is given
            if batch > 1:
                cache.batch_repeat_interleave(batch)
            full_mask = torch.cat([mask.new_ones(batch, prefix.length), mask], dim=1)  # (B, P + T)
            positions = positions_from_mask(full_mask)[:, prefix.length:]  # (B, T)
            out = self._run(embeds, full_mask, positions, cache, logits_to_keep, use_cache)
        logits = out.logits.float()  # (B, T', V)
        loss = None
        if labels is not None:
            labels = labels.to(self.device)
            if labels.shape != mask.shape:
                raise ValueError(f"labels have shape {tuple(labels.shape)}, expected {tuple(mask.shape)}")
            kept = logits.shape[1]
            targets = labels[:, -kept:][:, 1:]  # the token after each kept position but the last
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        return ForwardOutput(logits=logits, loss=loss, past_key_values=self._cache_of(out) if use_cache else None)

    @torch.no_grad()
    def cache_prefix(self, ids: torch.Tensor) -> PrefixCache | None:
        """Run fixed leading token ids (1, P) once and keep their KV cache.

        Returns None when P is 0, or when the model's cache is not a DynamicCache (the kind that
        can be copied and repeated to a batch). Callers then put the ids in front of the input.
        """
        if ids.shape[-1] == 0:
            return None
        embeds, mask = self.assemble([ids])
        out = self._run(embeds, mask, positions_from_mask(mask), None, logits_to_keep=1, use_cache=True)
        cache = self._cache_of(out)
        if not isinstance(cache, DynamicCache):
            return None
        return PrefixCache(cache=cache, length=embeds.shape[1])

    def _run(self, embeds, mask, positions, cache, logits_to_keep=0, use_cache=False):
        kwargs = {
            "inputs_embeds": embeds,
            "attention_mask": mask,
            "position_ids": positions,
            self._cache_arg: cache,
            "use_cache": use_cache,
        }
        if self.keeps_logits and logits_to_keep:
            kwargs["logits_to_keep"] = logits_to_keep
            if self._transformers_model and self.dtype in (torch.bfloat16, torch.float16):
                # Positions as an index tensor, not a count: the model then gathers the kept
                # hidden states into a contiguous block. On a strided slice, the bfloat16 output
                # projection runs as a batched matmul that first copies the whole (V, D) weight.
                length = embeds.shape[1]
                kwargs["logits_to_keep"] = torch.arange(length - logits_to_keep, length, device=embeds.device)
        gradient = torch.is_grad_enabled() and embeds.requires_grad and cache is None and not use_cache
        out = self._call_model(kwargs, gradient)
        if logits_to_keep and not self.keeps_logits:
            out.logits = out.logits[:, -logits_to_keep:]
        return out

    @property
    def compiled(self) -> bool:
        """Whether passes that need a gradient run through torch.compile."""
        return bool(self._compiled)

    def _call_model(self, kwargs: dict, gradient: bool):
        if gradient and self._compiled:
            try:
                # Compile the backward pass along with the forward one, so that a failure to
                # compile it shows here rather than in loss.backward().
                # NOTE: a private torch option, present in torch 2.13. Another version may lack it.
                with functorch_config.patch(force_non_lazy_backward_lowering=True):
                    return self._compiled[0](**kwargs)
            except torch.OutOfMemoryError:
                raise
            except Exception as error:  # noqa: BLE001 - any compiler failure falls back to eager
                # The eager call below raises again if the fault is in the inputs, not the compiler.
                # Only the first line is logged, because torch appends paragraphs of debugging advice.
                reason = (str(error).strip().splitlines() or [""])[0]
                logger.warning("torch.compile failed (%s: %s); running the model eagerly", type(error).__name__, reason)
                self._compiled.clear()
        return self.model(**kwargs)

    def _cache_of(self, out):
        return getattr(out, self._cache_arg, None)

    # -- generation ------------------------------------------------------------------------

    def generate(
        self,
        parts: Sequence[Part] | None = None,
        *,
        input_ids: torch.Tensor | None = None,
        one_hot: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 20,
        temperature: float | None = None,
        hard: bool | None = None,
        noise_scale: float | None = None,
        stop_at_eos: bool = False,
        generator: torch.Generator | None = None,
    ) -> GenerateOutput:
        """Generate `max_new_tokens` tokens, each an STGS sample of the next-token logits.

        Every sample y_t (B, 1, V) is fed back through the embedding matrix, so a loss on the
        output reaches the input's one-hot vectors. The prompt runs once; after it each step
        feeds one token and reuses the KV cache. A left-padded batch needs its attention_mask
        (0 on padding). With noise_scale=0 and argmax, the tokens equal greedy decoding.
        temperature, hard, noise_scale override the STGS settings for this call.
        With stop_at_eos, a row that emitted EOS gets pad ids and zero vectors afterwards, and
        generation ends early once every row has.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        embeds, mask = self.assemble(self._parts(parts, input_ids, one_hot, inputs_embeds), attention_mask)
        B = embeds.shape[0]
        positions = positions_from_mask(mask)  # (B, T)
        eos = torch.tensor(self.eos_token_ids, device=self.device, dtype=torch.long)
        alive = torch.ones(B, dtype=torch.bool, device=self.device)
        lengths = torch.full((B,), max_new_tokens, dtype=torch.long, device=self.device)
        new_ids, new_y, new_logits = [], [], []

        # Prefill: the whole prompt once, keeping the KV cache and only the last logits.
        out = self._run(embeds, mask, positions, None, logits_to_keep=1, use_cache=True)
        cache = self._cache_of(out)
        next_position = positions[:, -1:] + 1  # (B, 1)

        for step in range(max_new_tokens):
            # Sample the next token from the last position's logits.
            logits = out.logits[:, -1:].float()  # (B, 1, V)
            draw = self.stgs(logits, temperature=temperature, hard=hard, noise_scale=noise_scale, generator=generator)
            ids, y = draw.ids, draw.y  # (B, 1), (B, 1, V)

            # Rows past EOS emit pad and a zero vector, as HF's generate pads finished rows.
            if stop_at_eos:
                ids = torch.where(alive[:, None], ids, torch.full_like(ids, self.pad_token_id))
                y = y * alive[:, None, None].to(y.dtype)
                finished_now = alive & torch.isin(ids[:, 0], eos)
                lengths = torch.where(finished_now, torch.full_like(lengths, step + 1), lengths)
                alive = alive & ~finished_now
            new_ids.append(ids)
            new_y.append(y)
            new_logits.append(logits)
            if step == max_new_tokens - 1 or (stop_at_eos and not alive.any()):
                break

            # Feed the sample back: one new position on the cache.
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = self._run(self.embed(y), mask, next_position, cache, logits_to_keep=1, use_cache=True)
            cache = self._cache_of(out)
            next_position = next_position + 1

        ids = torch.cat(new_ids, dim=1)  # (B, N)
        text = [
            self.tokenizer.decode(row[: int(n)].tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False)
            for row, n in zip(ids, lengths)
        ]
        return GenerateOutput(ids=ids, y=torch.cat(new_y, dim=1), logits=torch.cat(new_logits, dim=1), text=text, lengths=lengths)


class _OneHotLookup(torch.autograd.Function):
    """one_hot @ weight computed as a row lookup, with the matmul's exact gradients.

    Forward: weight[one_hot.argmax(-1)], the same rows the product (B, T, V) @ (V, D) gives
    when every row of one_hot is exactly one-hot, at the cost of a gather. Backward: the
    gradient of the product, grad @ weight^T -> (B, T, V) for one_hot, and one_hot^T @ grad
    accumulated by row (index_add) for weight.
    """

    @staticmethod
    def forward(ctx, one_hot: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ids = one_hot.argmax(dim=-1)  # (B, T)
        ctx.save_for_backward(ids, weight)
        return weight[ids]  # (B, T, D)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ids, weight = ctx.saved_tensors
        V, D = weight.shape
        grad_one_hot = grad_weight = None
        if ctx.needs_input_grad[0]:
            # One 2-D product: a 3-D grad that is not contiguous would go through a slower
            # batched matmul with the whole (D, V) matrix.
            grad_one_hot = (grad.reshape(-1, D) @ weight.T).view(*grad.shape[:-1], V)  # (B, T, V)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.zeros_like(weight).index_add_(0, ids.reshape(-1), grad.reshape(-1, D))
        return grad_one_hot, grad_weight


def is_one_hot(vectors: torch.Tensor) -> bool:
    """True when every row over the last dim is exactly one-hot: entries >= 0, max 1, sum 1."""
    values = vectors.detach()
    return bool((values.amin(dim=-1) >= 0).all() and (values.amax(dim=-1) == 1).all() and (values.sum(dim=-1) == 1).all())


def embed_token_vectors(vectors: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Map token vectors (B, T, V) to embeddings (B, T, D) = vectors @ weight, weight (V, D).

    Exactly one-hot rows (STGS's hard samples) take a row lookup with the product's gradient,
    which skips the (B, T, V) @ (V, D) matmul in the forward pass; soft rows take the matmul.
    """
    if is_one_hot(vectors):
        return _OneHotLookup.apply(vectors, weight)
    return vectors @ weight  # (B, T, V) @ (V, D) -> (B, T, D)


def _id_list(value) -> list[int]:
    """Convert a token id, a list of ids or None to a list of ids."""
    if value is None:
        return []
    return [int(e) for e in (value if isinstance(value, (list, tuple)) else [value])]


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids (B, T) that count only attended tokens, so left padding does not shift them."""
    return (mask.long().cumsum(dim=-1) - 1).clamp(min=0)
