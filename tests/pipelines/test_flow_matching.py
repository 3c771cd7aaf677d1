"""Flow matching: the loss, the Euler sampler against exact flows, classifier-free
guidance, and cfg-parallel sampling in a real world of 2 against the local result."""

from __future__ import annotations

import math

import pytest
import torch

from vidpar.config import ParallelConfig
from vidpar.distributed import state as ps
from vidpar.pipelines import (
    FlowMatchEulerSampler,
    cfg_combine,
    flow_matching_loss,
    sample_timesteps,
    seeded_noise,
    shift_timesteps,
)

F64 = torch.float64

# Loss ---------------------------------------------------------------------------------


def test_loss_matches_its_definition():
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 2, 4, 5, 5, generator=gen, dtype=F64)
    noise = torch.randn(x0.shape, generator=gen, dtype=F64)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=F64)
    seen = {}

    def zero_model(x_t, t_in, cond):
        seen.update(x_t=x_t, t=t_in, cond=cond)
        return torch.zeros_like(x_t)

    loss = flow_matching_loss(zero_model, x0, "c", t=t, noise=noise)
    assert torch.allclose(loss, ((noise - x0) ** 2).mean())
    tb = t.view(3, 1, 1, 1, 1)
    assert torch.allclose(seen["x_t"], (1 - tb) * x0 + tb * noise)
    assert torch.equal(seen["t"], t) and seen["cond"] == "c"

    # The exact velocity, recovered from x_t, gives zero loss.
    def oracle(x_t, t_in, cond):
        return (x_t - x0) / t_in.view(-1, 1, 1, 1, 1)

    assert flow_matching_loss(oracle, x0, None, t=t, noise=noise) < 1e-20


def test_loss_is_finite_has_gradients_and_follows_the_generator():
    torch.manual_seed(0)
    model = torch.nn.Conv3d(3, 3, 1)
    x0 = torch.randn(4, 3, 2, 4, 4)

    def model_fn(x_t, t, cond):
        return model(x_t) * t.view(-1, 1, 1, 1, 1) + cond.view(-1, 1, 1, 1, 1)

    cond = torch.arange(4.0)
    loss = flow_matching_loss(model_fn, x0, cond, torch.Generator().manual_seed(1))
    assert loss.dim() == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    for p in model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    with torch.no_grad():
        again = flow_matching_loss(model_fn, x0, cond, torch.Generator().manual_seed(1))
        other = flow_matching_loss(model_fn, x0, cond, torch.Generator().manual_seed(2))
    assert again == loss and other != loss


def test_loss_rejects_mismatched_inputs():
    x0 = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="t must have shape"):
        flow_matching_loss(lambda x, t, c: x, x0, None, t=torch.zeros(3))
    with pytest.raises(ValueError, match="noise must be shaped"):
        flow_matching_loss(lambda x, t, c: x, x0, None, noise=torch.zeros(2, 4))


def test_timestep_sampling():
    gen = torch.Generator().manual_seed(0)
    uniform = sample_timesteps(4000, "uniform", gen)
    logit = sample_timesteps(4000, "logit_normal", gen)
    for t in (uniform, logit):
        assert t.shape == (4000,) and t.min() > 0 and t.max() < 1
        assert abs(t.mean().item() - 0.5) < 0.03
    assert abs(uniform.std().item() - 1 / math.sqrt(12)) < 0.015
    assert logit.std() < 0.24  # logit-normal(0, 1) concentrates on the middle (std ≈ 0.21)
    with pytest.raises(ValueError, match="unknown timestep sampling"):
        sample_timesteps(2, "cosine")


# Sampler against exact flows ---------------------------------------------------------


def test_timestep_grid_and_shift():
    plain = FlowMatchEulerSampler(4).timesteps()
    assert torch.allclose(plain, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=F64))
    shifted = FlowMatchEulerSampler(4, shift=3.0).timesteps()
    assert torch.allclose(shifted, torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0], dtype=F64))
    assert torch.equal(shift_timesteps(plain, 1.0), plain)
    with pytest.raises(ValueError):
        FlowMatchEulerSampler(0)
    with pytest.raises(ValueError):
        FlowMatchEulerSampler(4, shift=0.0)


def point_mass_velocity(targets: torch.Tensor):
    """Exact velocity for data concentrated at ``targets[cond]``: ``(x_t - x*) / t``."""

    def velocity(x, t, cond):
        return (x - targets[cond]) / t.view(-1, *([1] * (x.dim() - 1)))

    return velocity


@pytest.mark.parametrize("num_steps, shift", [(1, 1.0), (3, 1.0), (7, 4.0)])
def test_sampler_recovers_a_point_mass(num_steps, shift):
    targets = torch.randn(3, 2, 3, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    noise = seeded_noise((3, 2, 3, 4), seed=1, dtype=F64)
    cond = torch.tensor([2, 0, 1])
    sampler = FlowMatchEulerSampler(num_steps, shift=shift)
    out = sampler.sample(point_mass_velocity(targets), noise, cond)
    # Straight paths: Euler is exact for any step count.
    assert torch.allclose(out, targets[cond], atol=1e-12)


def test_sampler_on_a_linear_field_matches_the_euler_product():
    noise = seeded_noise((2, 5), seed=0, dtype=F64)
    a = 0.5
    out = FlowMatchEulerSampler(4).sample(lambda x, t, c: a * x, noise, None)
    assert torch.allclose(out, noise * (1 - a / 4) ** 4)
    out = FlowMatchEulerSampler(4, shift=3.0).sample(lambda x, t, c: a * x, noise, None)
    steps = [0.1, 0.15, 0.25, 0.5]  # the shifted grid 1, 0.9, 0.75, 0.5, 0
    assert torch.allclose(out, noise * math.prod(1 - a * d for d in steps))


def test_sampler_transports_noise_to_a_gaussian():
    mu, sigma = 0.7, 0.3

    def velocity(x, t, cond):
        t = t.view(-1, 1)
        var = (1 - t) ** 2 * sigma**2 + t**2
        centred = x - (1 - t) * mu
        e_x0 = mu + (1 - t) * sigma**2 / var * centred
        e_eps = t / var * centred
        return e_eps - e_x0

    noise = seeded_noise((4, 64), seed=3, dtype=F64)
    out = FlowMatchEulerSampler(200).sample(velocity, noise, None)
    # The 1-D Gaussian flow is the monotone map eps -> mu + sigma * eps.
    assert torch.allclose(out, mu + sigma * noise, atol=1e-2)


# Classifier-free guidance -------------------------------------------------------------


def test_cfg_combine():
    c, u = torch.tensor([3.0, -1.0]), torch.tensor([1.0, 1.0])
    assert torch.equal(cfg_combine(c, u, 0.0), u)
    assert torch.equal(cfg_combine(c, u, 1.0), c)
    assert torch.equal(cfg_combine(c, u, 2.5), torch.tensor([6.0, -4.0]))


class NotATensor:
    """A condition the sampler cannot batch: forces two separate passes."""

    def __init__(self, labels: torch.Tensor) -> None:
        self.labels = labels


@pytest.mark.parametrize("batchable", [True, False])
def test_guided_sampling_of_point_masses(batchable):
    # v = v_u + s (v_c - v_u) is the exact field of the point x_u + s (x_c - x_u).
    targets = torch.randn(4, 6, generator=torch.Generator().manual_seed(0), dtype=F64)
    exact = point_mass_velocity(targets)
    batches = []

    def velocity(x, t, cond):
        labels = cond if batchable else cond.labels
        batches.append(len(labels))
        return exact(x, t, labels)

    noise = seeded_noise((2, 6), seed=5, dtype=F64)
    cond, null = torch.tensor([1, 2]), torch.tensor([3, 3])
    if not batchable:
        cond, null = NotATensor(cond), NotATensor(null)
    s = 4.0
    out = FlowMatchEulerSampler(5).sample(velocity, noise, cond, null, guidance_scale=s)
    x_c, x_u = targets[[1, 2]], targets[[3, 3]]
    assert torch.allclose(out, x_u + s * (x_c - x_u), atol=1e-10)
    assert batches == ([4] * 5 if batchable else [2] * 10)


def test_guidance_scale_one_skips_the_unconditional_pass():
    seen = []

    def velocity(x, t, cond):
        seen.append(cond.tolist())
        return x

    noise = torch.ones(2, 3)
    FlowMatchEulerSampler(3).sample(velocity, noise, torch.tensor([0, 1]), torch.tensor([9, 9]))
    assert seen == [[0, 1]] * 3
    with pytest.raises(ValueError, match="needs null_cond"):
        FlowMatchEulerSampler(3).sample(velocity, noise, torch.tensor([0, 1]), None, 2.0)


def test_progress_hook_and_bar():
    calls = []
    noise = seeded_noise((1, 4), seed=0)
    sampler = FlowMatchEulerSampler(6)
    out = sampler.sample(lambda x, t, c: x, noise, None, progress=lambda *a: calls.append(a))
    assert calls == [(i, 6) for i in range(1, 7)]
    shown = sampler.sample(lambda x, t, c: x, noise, None, show_progress=True)
    assert torch.equal(out, shown)
    from rich.progress import Progress

    with Progress():  # another live display, as under Lightning's RichProgressBar
        nested = sampler.sample(lambda x, t, c: x, noise, None, show_progress=True)
    assert torch.equal(out, nested)


def test_sampler_keeps_the_noise_dtype_and_integrates_in_float32():
    noise = seeded_noise((2, 8), seed=0, dtype=torch.bfloat16)
    dtypes = []

    def velocity(x, t, cond):
        dtypes.append((x.dtype, t.dtype))
        return x

    out = FlowMatchEulerSampler(2).sample(velocity, noise, None)
    assert out.dtype == torch.bfloat16
    assert dtypes == [(torch.bfloat16, torch.float32)] * 2


# cfg parallelism in a real world ------------------------------------------------------

NUM_CLASSES, NUM_STEPS = 4, 6
COND, NULL = [0, 3], [NUM_CLASSES, NUM_CLASSES]


def linear_velocity_model():
    """A deterministic conditional velocity field: a seeded linear map of x plus a class
    embedding, modulated by t. Returns the field and the list of labels it was called with."""
    gen = torch.Generator().manual_seed(0)
    dim = 3 * 2 * 2 * 2
    linear = torch.nn.Linear(dim, dim, dtype=F64)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(dim, dim, generator=gen, dtype=F64) * 0.2)
        linear.bias.copy_(torch.randn(dim, generator=gen, dtype=F64))
    embed = torch.randn(NUM_CLASSES + 1, dim, generator=gen, dtype=F64)
    calls: list[list[int]] = []

    def velocity(x, t, cond):
        calls.append(cond.tolist())
        v = linear(x.flatten(1)) * (1 + t[:, None]) + embed[cond]
        return v.view_as(x)

    return velocity, calls


def guided_sample(guidance_scale: float) -> tuple[torch.Tensor, list[list[int]]]:
    velocity, calls = linear_velocity_model()
    noise = seeded_noise((2, 3, 2, 2, 2), seed=7, dtype=F64)
    sampler = FlowMatchEulerSampler(NUM_STEPS, shift=2.0)
    out = sampler.sample(
        velocity, noise, torch.tensor(COND), torch.tensor(NULL), guidance_scale=guidance_scale
    )
    return out, calls


def test_cfg_parallel_sampling_equals_local(worlds):
    assert not ps.model_parallel_is_initialized()
    reference, calls = guided_sample(3.0)
    assert calls == [COND + NULL] * NUM_STEPS  # locally, one batched pass of 2B per step
    unguided, _ = guided_sample(1.0)
    assert not torch.allclose(reference, unguided)

    world = worlds(2)
    (out0, calls0), (out1, calls1) = world.run(guided_sample, 3.0, layout=ParallelConfig(cfg=2))
    assert torch.equal(out0, out1)
    assert torch.allclose(out0, reference, rtol=1e-12, atol=1e-12)
    # cfg rank 0 ran only the conditional pass, cfg rank 1 only the unconditional one.
    assert calls0 == [COND] * NUM_STEPS and calls1 == [NULL] * NUM_STEPS

    # cfg = 1 in the same world (dp = 2): both passes run locally on every rank.
    results = world.run(guided_sample, 3.0, layout=ParallelConfig(cfg=1))
    for out, rank_calls in results:
        assert torch.allclose(out, reference, rtol=1e-12, atol=1e-12)
        assert rank_calls == calls

    # guidance_scale 1 under cfg = 2: no unconditional pass anywhere, same answer.
    for out, rank_calls in world.run(guided_sample, 1.0, layout=ParallelConfig(cfg=2)):
        assert torch.allclose(out, unguided, rtol=1e-12, atol=1e-12)
        assert rank_calls == [COND] * NUM_STEPS
