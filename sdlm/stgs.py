"""Straight-Through Gumbel-Softmax (STGS) sampling of tokens from logits.

Shapes: `B` batch (or Gumbel samples), `L` sequence positions, `V` vocabulary, `D` embedding width.

Example:
    >>> import torch
    >>> from sdlm import STGS
    >>> stgs = STGS(temperature=0.5)
    >>> out = stgs(torch.randn(2, 3, 10, requires_grad=True))
    >>> out.y.shape, out.ids.shape
    (torch.Size([2, 3, 10]), torch.Size([2, 3]))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

TemperatureMode = Literal["none", "scalar", "per_position", "conditional"]
HardMethod = Literal["argmax", "categorical", "nearest"]
Normalize = Literal["none", "center", "zscore"]
Distance = Literal["l2", "cosine", "dot"]

# Uniform noise source: (shape, device, generator) -> float32 tensor in [0, 1].
UniformFn = Callable[[tuple[int, ...], torch.device, "torch.Generator | None"], torch.Tensor]

_TEMPERATURE_MODES = ("none", "scalar", "per_position", "conditional")
_HARD_METHODS = ("argmax", "categorical", "nearest")
_NORMALIZE = ("none", "center", "zscore")
_DISTANCES = ("l2", "cosine", "dot")


@dataclass
class STGSOutput:
    """One STGS draw.

    y: (B, L, V) exact one-hot rows with the soft sample's gradient when hard, else the soft sample.
    ids: (B, L) sampled token ids (int64).
    probs: (B, L, V) float32 soft sample softmax((logits + noise_scale * g) / tau).
    temperature: tau used, broadcastable to (B, L, 1).
    """

    y: torch.Tensor
    ids: torch.Tensor
    probs: torch.Tensor
    temperature: torch.Tensor


def _torch_uniform(shape, device, generator):
    return torch.rand(shape, device=device, generator=generator, dtype=torch.float32)


def gumbel_noise(
    shape: tuple[int, ...],
    device: torch.device,
    generator: torch.Generator | None = None,
    uniform_fn: UniformFn = _torch_uniform,
) -> torch.Tensor:
    """Draw standard Gumbel noise -log(-log(u)) in float32.

    The uniform draw is clamped into the open interval (0, 1) first, so a source that returns
    exactly 0 or 1 still gives finite noise (about -4.5 and +16.6 at the clamps).
    """
    u = uniform_fn(tuple(shape), device, generator).to(torch.float32)
    tiny = torch.finfo(torch.float32).tiny
    u = u.clamp(min=tiny, max=1.0 - torch.finfo(torch.float32).eps / 2)
    return -torch.log(-torch.log(u))


def straight_through(y_hard: torch.Tensor, y_soft: torch.Tensor) -> torch.Tensor:
    """Return y_hard in the forward pass with the gradient of y_soft in the backward pass.

    This is the straight-through estimator of the Gumbel-Softmax trick (Jang et al. 2017,
    "Categorical Reparameterization with Gumbel-Softmax"; Maddison et al. 2017, "The Concrete
    Distribution"). The identity y_hard + (y_soft - y_soft.detach()) adds an exact zero in the
    forward pass, so the result equals y_hard bit for bit, while d(result)/d(y_soft) is the
    identity. Both tensors have the same shape, e.g. (B, L, V).
    """
    return y_hard + (y_soft - y_soft.detach())


def normalize_logits(logits: torch.Tensor, mode: Normalize, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Normalise each position's logits over the allowed vocabulary: centre or z-score.

    logits: (B, L, V) float32; mask: (V,) bool of allowed tokens or None for all.
    """
    if mode == "none":
        return logits
    if mask is None:
        mean = logits.mean(dim=-1, keepdim=True)
        centred = logits - mean
        if mode == "center":
            return centred
        std = centred.pow(2).mean(dim=-1, keepdim=True).sqrt()
        return centred / (std + 1e-6)

    # Statistics over the allowed tokens only, since masked entries are about to become -inf.
    weight = mask.to(logits.dtype)  # (V,)
    count = weight.sum()
    mean = (logits * weight).sum(dim=-1, keepdim=True) / count
    centred = logits - mean
    if mode == "center":
        return centred
    var = (centred.pow(2) * weight).sum(dim=-1, keepdim=True) / count
    return centred / (var.sqrt() + 1e-6)


class STGS(nn.Module):
    """Sample tokens from logits with the Straight-Through Gumbel-Softmax trick.

    Input logits (B, L, V); output an `STGSOutput` with y (B, L, V) and ids (B, L).

    The soft sample is softmax((logits + noise_scale * g) / tau) with g standard Gumbel noise.
    The hard token ids come from `hard_method`:
      - "argmax": argmax(logits + noise_scale * g), the textbook Gumbel-max estimator. Its
        distribution is softmax(logits / noise_scale) and does not depend on tau, which only
        shapes the gradient; `noise_scale` is the exploration knob.
      - "categorical": a draw from the soft sample's distribution.
      - "nearest": the token whose embedding is nearest to the soft sample's expected embedding
        probs @ W, by `distance` ("l2", "cosine" or "dot"); needs `embedding_weight` (V, D).

    Temperature modes: "none" (fixed tau), "scalar" (one learnable tau), "per_position" (one
    learnable tau per position, needs `length`), "conditional" (tau predicted from a hidden state
    (B, L, H) or (B, H) by a linear layer, needs `hidden_size`). Learnable temperatures stay in
    [min_temperature, max_temperature] through a sigmoid and start exactly at `temperature`.

    The softmax is computed in float32 whatever the input dtype; y is returned in the input dtype.
    """

    def __init__(
        self,
        temperature: float = 1.0,
        learnable_temperature: TemperatureMode = "none",
        *,
        min_temperature: float = 1e-4,
        max_temperature: float = 100.0,
        length: int | None = None,
        hidden_size: int | None = None,
        hard: bool = True,
        hard_method: HardMethod = "argmax",
        normalize: Normalize = "none",
        noise_scale: float = 1.0,
        distance: Distance = "l2",
        embedding_weight: torch.Tensor | None = None,
        uniform_fn: UniformFn = _torch_uniform,
    ) -> None:
        super().__init__()
        _check_choice("learnable_temperature", learnable_temperature, _TEMPERATURE_MODES)
        _check_choice("hard_method", hard_method, _HARD_METHODS)
        _check_choice("normalize", normalize, _NORMALIZE)
        _check_choice("distance", distance, _DISTANCES)
        _check_positive("temperature", temperature)
        _check_positive("min_temperature", min_temperature)
        if not min_temperature < max_temperature:
            raise ValueError(
                f"min_temperature ({min_temperature}) must be below max_temperature ({max_temperature})"
            )
        if learnable_temperature != "none" and not min_temperature <= temperature <= max_temperature:
            raise ValueError(
                f"temperature {temperature} is outside [min_temperature, max_temperature] = "
                f"[{min_temperature}, {max_temperature}]; widen the bounds or change the temperature"
            )
        if not (isinstance(noise_scale, (int, float)) and math.isfinite(noise_scale) and noise_scale >= 0):
            raise ValueError(f"noise_scale must be a finite number >= 0, got {noise_scale!r}")

        self.learnable_temperature = learnable_temperature
        self.min_temperature = float(min_temperature)
        self.max_temperature = float(max_temperature)
        self.hard = hard
        self.hard_method = hard_method
        self.normalize = normalize
        self.noise_scale = float(noise_scale)
        self.distance = distance
        # Detached, so the model's embedding Parameter is neither registered as a parameter of
        # this module nor saved with its state.
        self.embedding_weight = None if embedding_weight is None else embedding_weight.detach()
        self.uniform_fn = uniform_fn
        self.register_buffer("initial_temperature", torch.tensor(float(temperature)))

        # Learnable temperatures: tau = tau0 + g(raw) - g(0), with g a sigmoid onto the bounds
        # centred on tau0. Subtracting g(0) makes the start exact; the clamp absorbs rounding.
        if learnable_temperature == "scalar":
            self.temperature_raw = nn.Parameter(torch.zeros(()))
        elif learnable_temperature == "per_position":
            if length is None or length < 1:
                raise ValueError("learnable_temperature='per_position' needs length >= 1")
            self.temperature_raw = nn.Parameter(torch.zeros(length))
        elif learnable_temperature == "conditional":
            if hidden_size is None or hidden_size < 1:
                raise ValueError("learnable_temperature='conditional' needs hidden_size >= 1")
            self.temperature_head = nn.Linear(hidden_size, 1)
            nn.init.zeros_(self.temperature_head.weight)
            nn.init.zeros_(self.temperature_head.bias)

    def extra_repr(self) -> str:
        return (
            f"temperature={self.initial_temperature.item():g}, learnable={self.learnable_temperature}, "
            f"hard={self.hard}, hard_method={self.hard_method}, normalize={self.normalize}, "
            f"noise_scale={self.noise_scale:g}"
        )

    def _bounded(self, raw: torch.Tensor) -> torch.Tensor:
        low, high = self.min_temperature, self.max_temperature
        start = self.initial_temperature.clamp(low + 1e-6 * (high - low), high - 1e-6 * (high - low))
        offset = torch.logit((start - low) / (high - low))
        g = lambda x: low + (high - low) * torch.sigmoid(x + offset)  # noqa: E731
        tau = self.initial_temperature + g(raw.float()) - g(torch.zeros_like(raw, dtype=torch.float32))
        return tau.clamp(low, high)

    def temperature(self, hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        """Return the current tau, shaped to broadcast against (B, L, V): (), (1, L, 1) or (B, L|1, 1)."""
        mode = self.learnable_temperature
        if mode == "none":
            return self.initial_temperature.float()
        if mode == "scalar":
            return self._bounded(self.temperature_raw)
        if mode == "per_position":
            return self._bounded(self.temperature_raw).view(1, -1, 1)
        if hidden_states is None:
            raise ValueError("learnable_temperature='conditional' needs hidden_states in forward()")
        if hidden_states.dim() == 2:  # (B, H) -> (B, 1, H): one tau for every position of a row
            hidden_states = hidden_states.unsqueeze(1)
        raw = self.temperature_head(hidden_states.to(self.temperature_head.weight.dtype))  # (B, L, 1)
        return self._bounded(raw)

    def forward(
        self,
        logits: torch.Tensor,
        *,
        hidden_states: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        temperature: float | None = None,
        hard: bool | None = None,
        noise_scale: float | None = None,
        embedding_weight: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> STGSOutput:
        """Draw one STGS sample per row of `logits` (B, L, V).

        mask: (V,) bool of allowed tokens; the others get probability 0 and are never sampled.
        temperature, hard, noise_scale: override this module's settings for one call.
        """
        if logits.dim() != 3:
            raise ValueError(f"logits must have shape (batch, seq, vocab), got {tuple(logits.shape)}")
        hard = self.hard if hard is None else hard
        noise_scale = self.noise_scale if noise_scale is None else noise_scale
        if temperature is None:
            tau = self.temperature(hidden_states).to(logits.device)
        else:
            _check_positive("temperature", temperature)
            tau = torch.tensor(float(temperature), device=logits.device)

        # Work in float32 so float16/bfloat16 inputs, large logits and tiny tau stay finite.
        logits32 = normalize_logits(logits.float(), self.normalize, mask)

        # Perturb with Gumbel noise; noise_scale 0 skips the draw and gives plain softmax/argmax.
        if noise_scale > 0:
            noise = gumbel_noise(logits32.shape, logits32.device, generator, self.uniform_fn)
            perturbed = logits32 + noise_scale * noise
        else:
            perturbed = logits32
        scaled = perturbed / tau
        # Mask after dividing by tau: a -inf before it would give a learnable tau the gradient
        # -inf * 0 = nan from every masked token.
        if mask is not None:
            allowed = mask.to(logits.device)
            perturbed = perturbed.masked_fill(~allowed, float("-inf"))
            scaled = scaled.masked_fill(~allowed, float("-inf"))
        y_soft = torch.softmax(scaled, dim=-1)  # (B, L, V)

        # Pick the hard token.
        if self.hard_method == "argmax":
            ids = perturbed.argmax(dim=-1)
        elif self.hard_method == "categorical":
            B, L, V = y_soft.shape
            ids = torch.multinomial(y_soft.detach().reshape(B * L, V), 1, generator=generator).view(B, L)
        else:
            ids = self._nearest_ids(y_soft, embedding_weight, mask)

        if hard:
            y_hard = F.one_hot(ids, logits.shape[-1]).to(y_soft.dtype)
            y = straight_through(y_hard, y_soft)
        else:
            y = y_soft
        return STGSOutput(y=y.to(logits.dtype), ids=ids, probs=y_soft, temperature=tau)

    def _nearest_ids(
        self, y_soft: torch.Tensor, embedding_weight: torch.Tensor | None, mask: torch.Tensor | None
    ) -> torch.Tensor:
        weight = embedding_weight if embedding_weight is not None else self.embedding_weight
        if weight is None:
            raise ValueError("hard_method='nearest' needs embedding_weight (the (V, D) embedding matrix)")
        weight = weight.detach().float()[: y_soft.shape[-1]]  # (V, D)
        expected = y_soft.detach() @ weight  # (B, L, V) @ (V, D) -> (B, L, D)
        if self.distance == "l2":
            # ||e - w||^2 = ||e||^2 - 2 e.w + ||w||^2; the ||e||^2 term does not change the argmin.
            score = 2 * expected @ weight.T - weight.pow(2).sum(-1)  # (B, L, V), higher is nearer
        elif self.distance == "cosine":
            score = F.normalize(expected, dim=-1) @ F.normalize(weight, dim=-1).T
        else:
            score = expected @ weight.T
        if mask is not None:
            score = score.masked_fill(~mask.to(score.device), float("-inf"))
        return score.argmax(dim=-1)


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _check_positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
