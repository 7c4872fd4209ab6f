import pytest
import torch

from sdlm.stgs import STGS, gumbel_noise, straight_through


def test_hard_rows_are_exact_one_hots():
    logits = torch.randn(3, 5, 11, requires_grad=True)
    out = STGS(temperature=0.7)(logits, generator=torch.Generator().manual_seed(0))
    assert out.y.shape == (3, 5, 11)
    assert set(out.y.detach().unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(out.y.detach().sum(-1), torch.ones(3, 5))
    assert torch.equal(out.y.detach().argmax(-1), out.ids)


@pytest.mark.parametrize("noise_scale", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("temperature", [0.1, 1.0, 5.0])
def test_argmax_frequencies_match_softmax(noise_scale, temperature):
    # Gumbel-max draws follow softmax(logits / noise_scale); tau only shapes the gradient.
    logits = torch.tensor([[[2.0, 1.0, 0.0, -1.0, 0.5]]])
    n = 20000
    out = STGS(temperature=temperature, noise_scale=noise_scale)(
        logits.expand(n, -1, -1), generator=torch.Generator().manual_seed(1)
    )
    freq = torch.bincount(out.ids.view(-1), minlength=5).float() / n
    expected = torch.softmax(logits[0, 0] / noise_scale, -1)
    # 5 standard errors of a binomial proportion.
    tolerance = 5 * (expected * (1 - expected) / n).sqrt()
    assert torch.all((freq - expected).abs() < tolerance), (freq, expected)


def test_categorical_method_samples_from_soft():
    logits = torch.zeros(4000, 1, 3)
    out = STGS(hard_method="categorical", noise_scale=0.0)(logits, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(out.ids.view(-1), minlength=3).float() / 4000
    assert torch.allclose(freq, torch.full((3,), 1 / 3), atol=0.05)


@pytest.mark.parametrize("hard", [True, False])
@pytest.mark.parametrize("mode", ["none", "scalar", "per_position"])
def test_gradients_reach_logits_and_temperature(hard, mode):
    stgs = STGS(temperature=0.8, learnable_temperature=mode, length=4, hard=hard, min_temperature=0.1, max_temperature=5.0)
    logits = torch.randn(2, 4, 9, requires_grad=True)
    out = stgs(logits, generator=torch.Generator().manual_seed(0))
    weights = torch.randn(9)
    (out.y * weights).sum().backward()
    assert logits.grad is not None
    assert logits.grad.abs().sum() > 0
    if mode != "none":
        assert stgs.temperature_raw.grad is not None
        assert stgs.temperature_raw.grad.abs().sum() > 0


def test_conditional_temperature_from_hidden_state():
    stgs = STGS(temperature=0.5, learnable_temperature="conditional", hidden_size=6, min_temperature=0.1, max_temperature=2.0)
    hidden = torch.randn(2, 3, 6)
    tau = stgs.temperature(hidden)
    assert tau.shape == (2, 3, 1)
    assert torch.all(tau == 0.5)
    out = stgs(torch.randn(2, 3, 7, requires_grad=True), hidden_states=hidden)
    (out.y * torch.randn(7)).sum().backward()
    assert stgs.temperature_head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["scalar", "per_position", "conditional"])
@pytest.mark.parametrize("start", [0.05, 1.0, 3.7, 10.0])
def test_learnable_temperature_starts_exactly(mode, start):
    stgs = STGS(temperature=start, learnable_temperature=mode, length=3, hidden_size=4, min_temperature=0.05, max_temperature=10.0)
    tau = stgs.temperature(torch.randn(1, 3, 4))
    assert torch.all(tau == torch.tensor(start, dtype=torch.float32))


def test_learnable_temperature_stays_in_bounds():
    stgs = STGS(temperature=1.0, learnable_temperature="per_position", length=3, min_temperature=0.2, max_temperature=3.0)
    with torch.no_grad():
        stgs.temperature_raw.copy_(torch.tensor([-1e4, 0.0, 1e4]))
    tau = stgs.temperature().view(-1)
    assert tau[0] >= 0.2
    assert tau[2] <= 3.0
    assert tau[1] == 1.0


def test_zero_noise_soft_equals_softmax():
    logits = torch.randn(2, 3, 8)
    out = STGS(temperature=0.7, noise_scale=0.0, hard=False)(logits)
    assert torch.allclose(out.y, torch.softmax(logits / 0.7, -1))
    assert torch.equal(out.ids, logits.argmax(-1))


def test_seeded_generator_reproduces():
    logits = torch.randn(2, 3, 50)
    stgs = STGS()
    a = stgs(logits, generator=torch.Generator().manual_seed(7))
    b = stgs(logits, generator=torch.Generator().manual_seed(7))
    c = stgs(logits, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.y, b.y)
    assert torch.equal(a.probs, b.probs)
    assert not torch.equal(a.probs, c.probs)


@pytest.mark.parametrize("value", [0.0, 1.0])
def test_uniform_draw_at_bounds_stays_finite(value):
    def constant_uniform(shape, device, generator):
        return torch.full(shape, value)

    noise = gumbel_noise((2, 3), torch.device("cpu"), uniform_fn=constant_uniform)
    assert torch.isfinite(noise).all()
    stgs = STGS(temperature=0.01, uniform_fn=constant_uniform)
    logits = torch.randn(2, 3, 6, requires_grad=True)
    out = stgs(logits)
    assert torch.isfinite(out.y).all()
    assert torch.isfinite(out.probs).all()
    assert torch.equal(out.y.detach().sum(-1), torch.ones(2, 3))
    out.y.sum().backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1e-4, 1.0])
@pytest.mark.parametrize("scale", [1.0, 1e4])
@pytest.mark.parametrize("normalize", ["none", "center", "zscore"])
def test_extreme_inputs_stay_finite(dtype, temperature, scale, normalize):
    logits = (torch.randn(2, 4, 16) * scale).clamp(-1e4, 1e4).to(dtype).requires_grad_()
    for hard in (True, False):
        out = STGS(temperature=temperature, normalize=normalize, hard=hard)(logits, generator=torch.Generator().manual_seed(0))
        assert out.y.dtype == dtype
        assert torch.isfinite(out.y).all()
        assert torch.isfinite(out.probs).all()
        (out.y.float() * torch.randn(16)).sum().backward()
        assert torch.isfinite(logits.grad).all()
        logits.grad = None


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature_rejected(bad):
    with pytest.raises(ValueError, match="temperature"):
        STGS(temperature=bad)
    with pytest.raises(ValueError, match="temperature"):
        STGS()(torch.randn(1, 2, 3), temperature=bad)


def test_bad_choices_rejected():
    with pytest.raises(ValueError, match="hard_method"):
        STGS(hard_method="top1")
    with pytest.raises(ValueError, match="noise_scale"):
        STGS(noise_scale=-1)
    with pytest.raises(ValueError, match="min_temperature"):
        STGS(min_temperature=2.0, max_temperature=1.0)


def test_hard_gradient_equals_soft_gradient():
    # Same noise, same loss: the straight-through gradient on the logits is the soft one.
    logits = torch.randn(2, 3, 7)
    weights = torch.randn(7)
    grads = []
    for hard in (True, False):
        x = logits.clone().requires_grad_()
        out = STGS(temperature=0.6, hard=hard)(x, generator=torch.Generator().manual_seed(3))
        (out.y * weights).sum().backward()
        grads.append(x.grad)
    assert torch.allclose(grads[0], grads[1])


def test_straight_through_forward_is_exact():
    y_soft = torch.softmax(torch.randn(4, 5, 9) * 3, -1)
    y_hard = torch.nn.functional.one_hot(y_soft.argmax(-1), 9).float()
    assert torch.equal(straight_through(y_hard, y_soft), y_hard)


@pytest.mark.parametrize("distance", ["l2", "cosine", "dot"])
def test_nearest_method_picks_embedding_neighbour(distance):
    weight = torch.eye(5) * 3.0  # (V, D) with orthogonal rows
    logits = torch.full((1, 2, 5), -20.0)
    logits[0, 0, 3] = 20.0
    logits[0, 1, 1] = 20.0
    out = STGS(hard_method="nearest", distance=distance, noise_scale=0.0, embedding_weight=weight)(logits)
    assert out.ids.tolist() == [[3, 1]]


def test_mask_excludes_tokens():
    mask = torch.tensor([False, True, False, True])
    out = STGS()(torch.zeros(500, 1, 4), mask=mask, generator=torch.Generator().manual_seed(0))
    assert set(out.ids.unique().tolist()) == {1, 3}
    assert torch.all(out.probs[..., ~mask] == 0)


@pytest.mark.parametrize("mode", ["scalar", "per_position"])
@pytest.mark.parametrize("normalize", ["none", "zscore"])
def test_masked_tokens_keep_temperature_gradient_finite(mode, normalize):
    # Masked tokens are -inf in the softmax; the learnable temperature's gradient must not
    # pick up -inf * 0 from them.
    mask = torch.tensor([False, True, True, False, True, True])
    stgs = STGS(learnable_temperature=mode, length=3, normalize=normalize)
    logits = torch.randn(2, 3, 6, requires_grad=True)
    out = stgs(logits, mask=mask, generator=torch.Generator().manual_seed(0))
    weights = torch.randn(2, 3, 6)

    (out.y * weights).sum().backward()

    assert torch.isfinite(stgs.temperature_raw.grad).all()
    assert torch.isfinite(logits.grad).all()
    assert torch.all(logits.grad[..., ~mask] == 0)
    assert torch.all(out.probs[..., ~mask] == 0)
    assert torch.all(mask[out.ids])
