"""Rectified flow (flow matching): the training loss and an Euler sampler with
classifier-free guidance, run in parallel over the cfg group when there is one.

Convention: ``x_t = (1 - t) · x0 + t · eps`` with data at ``t = 0`` and noise at ``t = 1``;
the model predicts the velocity ``v = dx_t/dt = eps - x0``. Sampling integrates
``dx/dt = v`` from ``t = 1`` down to ``t = 0``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F

from vidpar.distributed.state import get_cfg_group, model_parallel_is_initialized

#: ``velocity_fn(x_t, t, cond) -> v``: ``x_t`` ``[B, ...]``, ``t`` ``[B]`` in ``[0, 1]``.
VelocityFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
#: ``progress(step, num_steps)``, called after each step with ``step`` in ``1..num_steps``.
ProgressFn = Callable[[int, int], None]
TimestepSampling = Literal["uniform", "logit_normal"]


def _expand_like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``[B]`` to ``[B, 1, 1, ...]`` broadcastable against ``x``."""
    return t.reshape(t.shape[0], *([1] * (x.dim() - 1)))


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Float32 or wider: timesteps and the integrated state never live in half precision."""
    return torch.promote_types(dtype, torch.float32)


def sample_timesteps(
    batch_size: int,
    sampling: TimestepSampling = "uniform",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> torch.Tensor:
    """Training timesteps ``[B]`` in ``(0, 1)`` (float32).

    ``uniform``: ``t ~ U(0, 1)``. ``logit_normal``: ``t = sigmoid(n)``, ``n ~ N(logit_mean,
    logit_std²)``, which spends more of training on the middle of the path (SD3's choice).
    """
    if sampling == "uniform":
        return torch.rand(batch_size, generator=generator, device=device)
    if sampling == "logit_normal":
        n = torch.randn(batch_size, generator=generator, device=device)
        return torch.sigmoid(n * logit_std + logit_mean)
    raise ValueError(f"unknown timestep sampling {sampling!r}; use 'uniform' or 'logit_normal'")


def flow_matching_loss(
    model_fn: VelocityFn,
    x0: torch.Tensor,
    cond: Any,
    generator: torch.Generator | None = None,
    *,
    timestep_sampling: TimestepSampling = "uniform",
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error between ``model_fn(x_t, t, cond)`` and the velocity ``eps - x0``.

    ``t`` (``[B]``) and ``noise`` (like ``x0``) are drawn from ``generator`` unless given;
    ``t`` follows ``timestep_sampling`` (default uniform, see :func:`sample_timesteps`).
    Ranks that share one batch (a tp or sp group) must draw the same ``t`` and noise: give
    them identically seeded generators. The loss is computed in float32 or wider.
    """
    if t is None:
        t = sample_timesteps(x0.shape[0], timestep_sampling, generator, x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    if t.shape != (x0.shape[0],):
        raise ValueError(f"t must have shape [B] = [{x0.shape[0]}], got {tuple(t.shape)}")
    if noise.shape != x0.shape:
        raise ValueError(f"noise must be shaped like x0 {tuple(x0.shape)}, got {noise.shape}")
    t = t.to(x0.device, _state_dtype(x0.dtype))
    tb = _expand_like(t, x0)
    x_t = ((1 - tb) * x0 + tb * noise).to(x0.dtype)
    target = noise - x0
    pred = model_fn(x_t, t, cond)
    dtype = _state_dtype(pred.dtype)
    return F.mse_loss(pred.to(dtype), target.to(dtype))


def cfg_combine(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``v_uncond + scale · (v_cond - v_uncond)``."""
    return v_uncond + scale * (v_cond - v_uncond)


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """``shift · t / (1 + (shift - 1) · t)``: ``shift > 1`` spends more steps near noise
    (the SD3 / Wan schedule shift); ``shift = 1`` leaves ``t`` as it is."""
    return shift * t / (1 + (shift - 1) * t)


def seeded_noise(
    shape: tuple[int, ...] | torch.Size,
    seed: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Gaussian noise drawn on the CPU from ``seed``: the same on every rank and device."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float32).to(device, dtype)


def _is_global_rank_zero() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


@contextmanager
def _progress_bar(num_steps: int, enabled: bool) -> Iterator[ProgressFn | None]:
    """A rich progress bar for the denoising steps (global rank 0 only), as a hook."""
    if not enabled or not _is_global_rank_zero():
        yield None
        return
    from rich.errors import LiveError
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    try:
        bar.start()
    except LiveError:  # another live display (e.g. Lightning's RichProgressBar) owns the terminal
        yield None
        return
    try:
        task = bar.add_task("denoising", total=num_steps)
        yield lambda step, total: bar.update(task, completed=step)
    finally:
        bar.stop()


class FlowMatchEulerSampler:
    """Euler integration of the flow from noise (``t = 1``) to data (``t = 0``).

    ``num_steps`` velocity evaluations (per guidance branch) on the grid
    ``shift_timesteps(linspace(1, 0, num_steps + 1), shift)``.

    Classifier-free guidance combines ``v = v_uncond + s · (v_cond - v_uncond)``. When a
    parallel layout is initialised with a cfg group of 2, cfg rank 0 runs the conditional
    pass and cfg rank 1 the unconditional one at the same time; one ``all_gather`` over the
    cfg group exchanges the velocities, so every rank holds the same ``x``. Otherwise both
    passes run here, batched into one call of ``2B`` when ``cond`` and ``null_cond`` are
    tensors. Given the same noise, the result does not depend on the layout (up to
    floating-point summation order).
    """

    def __init__(self, num_steps: int, shift: float = 1.0) -> None:
        if num_steps < 1:
            raise ValueError(f"num_steps must be positive, got {num_steps}")
        if shift <= 0:
            raise ValueError(f"shift must be positive, got {shift}")
        self.num_steps = num_steps
        self.shift = shift

    def __repr__(self) -> str:
        return f"FlowMatchEulerSampler(num_steps={self.num_steps}, shift={self.shift})"

    def timesteps(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The ``num_steps + 1`` times visited, from 1 down to 0."""
        t = torch.linspace(1.0, 0.0, self.num_steps + 1, dtype=torch.float64)
        return shift_timesteps(t, self.shift).to(dtype)

    @torch.no_grad()
    def sample(
        self,
        velocity_fn: VelocityFn,
        noise: torch.Tensor,
        cond: Any,
        null_cond: Any = None,
        guidance_scale: float = 1.0,
        *,
        progress: ProgressFn | None = None,
        show_progress: bool = False,
    ) -> torch.Tensor:
        """Integrate from ``noise`` (``[B, ...]``) to a sample shaped like it.

        ``velocity_fn(x, t, cond)`` gets ``x`` in ``noise``'s dtype and ``t`` ``[B]``.
        ``null_cond`` (the unconditional input) is needed unless ``guidance_scale == 1``,
        which skips the unconditional pass. ``progress(step, num_steps)`` is called after
        each step; ``show_progress`` draws a progress bar on global rank 0.
        """
        guided = guidance_scale != 1.0
        if guided and null_cond is None:
            raise ValueError("guidance_scale != 1 needs null_cond (the unconditional input)")
        cfg_group = get_cfg_group() if model_parallel_is_initialized() else None
        if cfg_group is not None and cfg_group.world_size > 2:
            raise ValueError(
                f"cfg parallelism splits the conditional and unconditional passes, so the "
                f"cfg group must have 1 or 2 ranks, got {cfg_group.world_size}"
            )
        parallel = guided and cfg_group is not None and cfg_group.world_size == 2
        batched = guided and not parallel and _batchable(cond, null_cond)

        batch = noise.shape[0]
        state_dtype = _state_dtype(noise.dtype)
        x = noise.to(state_dtype)
        times = self.timesteps(state_dtype).to(noise.device)

        def velocity(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if not guided:
                return velocity_fn(x_in, t, cond).to(state_dtype)
            if parallel:
                mine = cond if cfg_group.rank_in_group == 0 else null_cond
                v = velocity_fn(x_in, t, mine).to(state_dtype)
                v_cond, v_uncond = cfg_group.all_gather(v.unsqueeze(0), dim=0).unbind(0)
            elif batched:
                v = velocity_fn(
                    torch.cat([x_in, x_in]), torch.cat([t, t]), torch.cat([cond, null_cond])
                ).to(state_dtype)
                v_cond, v_uncond = v[:batch], v[batch:]
            else:
                v_cond = velocity_fn(x_in, t, cond).to(state_dtype)
                v_uncond = velocity_fn(x_in, t, null_cond).to(state_dtype)
            return cfg_combine(v_cond, v_uncond, guidance_scale)

        with _progress_bar(self.num_steps, show_progress) as bar:
            for i in range(self.num_steps):
                t, t_next = times[i], times[i + 1]
                v = velocity(x.to(noise.dtype), t.expand(batch))
                x = x + (t_next - t) * v
                for hook in (progress, bar):
                    if hook is not None:
                        hook(i + 1, self.num_steps)
        return x.to(noise.dtype)


def _batchable(cond: Any, null_cond: Any) -> bool:
    """Whether the two branches can run as one call of twice the batch."""
    return (
        isinstance(cond, torch.Tensor)
        and isinstance(null_cond, torch.Tensor)
        and cond.shape == null_cond.shape
        and cond.dtype == null_cond.dtype
    )
