"""Attention of a block of queries over a block of keys that also returns the log-sum-exp
(lse) per query, forward and backward, on torch's fused kernels.

Ring attention (and USP's ring part) attends over one K/V block at a time and merges the
partial results by their lse (:mod:`vidpar.nn.softmax_merge`). Its backward calls each
block's fused backward with the *final* output and lse (as ring-flash-attn does): the
kernel then recomputes the block's true probabilities, and the blocks' dq add up to the
full dq.

Tensors are ``[B, H, S, D]`` with any strides whose last one is 1 (the layers' ``[B, S, H,
D]`` tensors, transposed by :func:`heads_first`, need no copy); outputs keep ``[B, S, H, D]`` memory. lse is
``[B, H, S]``, float32 (float64 for float64), whatever shape a kernel gives (cuDNN
``[B, H, S, 1]`` or ``[B, H, S]``, memory-efficient padded along S to a multiple of 32).

Backends, tried in this order until one runs; the one that ran is cached per pass, device,
dtype, head dim and shape class, and logged once (with why the ones before it did not):

* CUDA, fp16/bf16: ``cudnn``, ``flash``, ``efficient``; fp32: ``efficient``;
* CPU, fp32/bf16/fp16: ``cpu_flash``;
* ``math`` for float64 (exact; the equivalence tests rely on it) and as the last resort:
  matmul + logsumexp in float32/float64, in query × key chunks of at most
  :data:`MATH_CHUNK_ELEMENTS` scores, so it never holds a full ``[S, S]`` matrix.

Kernel arguments go by the names in the running torch's op schema (a reordered signature
is handled; a missing argument skips that backend).

A ``bias`` (:func:`key_bias`: ``0`` for a key that counts, a huge negative number for one
that does not, per sample) is added to the scores of the backends that take one
(``cudnn``, ``efficient``, ``cpu_flash``, ``math``; ``flash`` takes none): the static,
compilable way to leave out padded text keys.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from vidpar.nn.softmax_merge import SoftmaxMerge

__all__ = [
    "BACKENDS",
    "MATH_CHUNK_ELEMENTS",
    "attention_backward",
    "attention_forward",
    "chosen_backends",
    "clear_choices",
    "heads_first",
    "key_bias",
    "math_chunks",
    "use_backend",
]

BACKENDS = ("cudnn", "flash", "efficient", "cpu_flash", "math")
#: Scores per chunk of the math path (32 MiB in float64).
MATH_CHUNK_ELEMENTS = 1 << 22

_log = logging.getLogger(__name__)
_aten = torch.ops.aten
_choices: dict[tuple, str] = {}
_forced: str | None = None
_cudnn_lse_dims: int = 4  # what cuDNN's forward returned last ([B, H, S, 1] in recent torch)
_rng: dict[tuple[str, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def heads_first(x: torch.Tensor) -> torch.Tensor:
    """``[B, S, H, D] -> [B, H, S, D]``, a view where the last dim is contiguous."""
    return (x if x.stride(-1) == 1 else x.contiguous()).transpose(1, 2)


def key_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive score bias ``[B, 1, 1, L]`` of a key mask ``[B, L]`` (``True``: the key
    counts): ``0``, or ``dtype``'s lowest finite value, which no score survives (finite, so
    a row whose keys are all left out still has a finite lse, and merges with weight 0)."""
    low = torch.finfo(dtype).min
    zeros = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return zeros.masked_fill(~mask.bool(), low)[:, None, None]


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax(q kᵀ · scale + bias) v`` in q's dtype and its lse ``[B, H, Sq]``;
    ``bias``: ``[B, 1, 1, Sk]`` (:func:`key_bias`) or ``None``."""
    return _dispatch("forward", q, k, v, lambda name: _FORWARD[name](q, k, v, scale, bias), bias)


def attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of one block, given the final attention output ``out`` (over every block)
    and its lse ``[B, H, Sq]``; ``dout`` should share ``out``'s layout; ``bias`` as the
    forward's."""
    return _dispatch(
        "backward",
        q,
        k,
        v,
        lambda name: _BACKWARD[name](dout, q, k, v, out, lse, scale, bias),
        bias,
    )


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# Choosing a backend -------------------------------------------------------------------


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run every block on backend ``name`` (no fallback: its errors propagate)."""
    global _forced
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {BACKENDS}")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def chosen_backends() -> dict[str, str]:
    """The cached choices, e.g. ``{"forward cuda:0 bfloat16 d128 ...": "cudnn"}``."""
    return {_describe(key): name for key, name in _choices.items()}


def clear_choices() -> None:
    """Forget the cached choices (the next block probes again)."""
    _choices.clear()


def _candidates(device: torch.device, dtype: torch.dtype) -> tuple[str, ...]:
    if dtype == torch.float64:
        return ("math",)
    if device.type == "cuda":
        if dtype in (torch.float16, torch.bfloat16):
            return ("cudnn", "flash", "efficient", "math")
        return ("efficient", "math")
    if device.type == "cpu":
        return ("cpu_flash", "math")
    return ("math",)


def _shape_class(*tensors: torch.Tensor) -> tuple:
    """What decides whether a kernel applies besides dtype and head dim: single-token
    sequences, and 16-byte alignment of the pointers and strides."""
    itemsize = tensors[0].element_size()

    def aligned(t: torch.Tensor) -> bool:
        return t.data_ptr() % 16 == 0 and all((s * itemsize) % 16 == 0 for s in t.stride()[:-1])

    return (tensors[0].shape[2] == 1, tensors[1].shape[2] == 1, all(map(aligned, tensors)))


def _dispatch(pass_name: str, q, k, v, call: Callable[[str], tuple], bias=None):
    if _forced is not None:
        return call(_forced)
    key = (pass_name, q.device, q.dtype, q.shape[-1], _shape_class(q, k, v), bias is not None)
    candidates = _candidates(q.device, q.dtype)
    cached = _choices.get(key)
    start = candidates.index(cached) if cached in candidates else 0
    skipped = []
    for name in candidates[start:]:
        try:
            result = call(name)
        except torch.cuda.OutOfMemoryError:
            raise
        except (RuntimeError, NotImplementedError) as err:
            if name == candidates[-1]:
                raise
            skipped.append(f"{name}: {str(err).strip().splitlines()[0][:200]}")
            continue
        if cached != name:
            _choices[key] = name
            why = f" ({'; '.join(skipped)})" if skipped else ""
            _log.info("attention kernels: %s uses %s%s", _describe(key), name, why)
        return result
    raise AssertionError("unreachable: the last candidate raises")


def _describe(key: tuple) -> str:
    pass_name, device, dtype, head_dim, (single_q, single_k, aligned), biased = key
    shape = "aligned" if aligned else "unaligned"
    shape += ", bias" if biased else ""
    shape += ", 1 query" if single_q else ""
    shape += ", 1 key" if single_k else ""
    return f"{pass_name} {device} {str(dtype).removeprefix('torch.')} d{head_dim} ({shape})"


# Calling torch's kernels ----------------------------------------------------------------


def _invoke(packet, **values):
    """Call ``packet.default`` with ``values`` matched to its schema's argument names
    (a trailing ``_`` ignored); arguments left out take their defaults."""
    op = packet.default
    kwargs, known = {}, set()
    for arg in op._schema.arguments:
        name = arg.name.rstrip("_")
        known.add(name)
        if name in values:
            kwargs[arg.name] = values[name]
        elif not arg.has_default_value():
            raise RuntimeError(f"{op._schema.name} needs {arg.name!r}, which vidpar does not pass")
    unknown = [n for n, value in values.items() if n not in known and value is not None]
    if unknown:
        raise RuntimeError(f"{op._schema.name} takes no {unknown} in torch {torch.__version__}")
    return op(**kwargs)


def _checked(out: torch.Tensor, lse: torch.Tensor, q, v) -> tuple[torch.Tensor, torch.Tensor]:
    """A kernel's output, checked, and its lse as ``[B, H, Sq]`` (a view where possible)."""
    if lse.dim() == 4 and lse.shape[-1] == 1:
        lse = lse.squeeze(-1)
    if tuple(out.shape) != (*q.shape[:3], v.shape[-1]) or (
        lse.dim() != 3 or lse.shape[:2] != q.shape[:2] or lse.shape[2] < q.shape[2]
    ):
        raise RuntimeError(f"unexpected shapes: out {out.shape}, lse {lse.shape}, q {q.shape}")
    return out, lse[:, :, : q.shape[2]].to(_accumulate_dtype(q.dtype))


def _rng_state(name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The seed/offset a backward takes (unused without dropout): its forward's, or zeros."""
    if (name, device) not in _rng:
        _rng[(name, device)] = (torch.zeros((), dtype=torch.int64, device=device),) * 2
    return _rng[(name, device)]


def _full_bias(bias, q, k):
    """``bias`` expanded to ``[B, H, Sq, Sk]`` (a view) with its rows 16-element aligned, as
    the fused kernels take it; ``None`` stays ``None``."""
    if bias is None:
        return None
    length = k.shape[2]
    padded = F.pad(bias.to(q.dtype), (0, -length % 16))[..., :length]
    return padded.expand(q.shape[0], q.shape[1], q.shape[2], length)


def _cudnn_forward(q, k, v, scale, bias=None):
    global _cudnn_lse_dims
    out, lse, *rest = _invoke(
        _aten._scaled_dot_product_cudnn_attention,
        query=q, key=k, value=v, attn_bias=_full_bias(bias, q, k), compute_log_sumexp=True,
        dropout_p=0.0, is_causal=False, return_debug_mask=False, scale=scale,
    )  # fmt: skip
    _cudnn_lse_dims = lse.dim()
    _rng[("cudnn", q.device)] = (rest[4], rest[5])
    return _checked(out, lse, q, v)


def _cudnn_backward(dout, q, k, v, out, lse, scale, bias=None):
    lse = lse.float().contiguous()
    seed, offset = _rng_state("cudnn", q.device)
    return _invoke(
        _aten._scaled_dot_product_cudnn_attention_backward,
        grad_out=dout, query=q, key=k, value=v, out=out,
        logsumexp=lse.unsqueeze(-1) if _cudnn_lse_dims == 4 else lse,
        philox_seed=seed, philox_offset=offset, attn_bias=_full_bias(bias, q, k), cum_seq_q=None,
        cum_seq_k=None, max_q=q.shape[2], max_k=k.shape[2], dropout_p=0.0, is_causal=False,
        scale=scale,
    )[:3]  # fmt: skip


def _flash_forward(q, k, v, scale, bias=None):
    out, lse, *rest = _invoke(
        _aten._scaled_dot_product_flash_attention,
        query=q, key=k, value=v, dropout_p=0.0, is_causal=False, return_debug_mask=False,
        scale=scale, attn_bias=bias,
    )  # fmt: skip
    _rng[("flash", q.device)] = (rest[4], rest[5])
    return _checked(out, lse, q, v)


def _flash_backward(dout, q, k, v, out, lse, scale, bias=None):
    seed, offset = _rng_state("flash", q.device)
    return _invoke(
        _aten._scaled_dot_product_flash_attention_backward,
        grad_out=dout, query=q, key=k, value=v, out=out, logsumexp=lse.float().contiguous(),
        cum_seq_q=None, cum_seq_k=None, max_q=q.shape[2], max_k=k.shape[2], dropout_p=0.0,
        is_causal=False, philox_seed=seed, philox_offset=offset, scale=scale, attn_bias=bias,
    )[:3]  # fmt: skip


def _efficient_forward(q, k, v, scale, bias=None):
    out, lse, seed, offset = _invoke(
        _aten._scaled_dot_product_efficient_attention,
        query=q, key=k, value=v, attn_bias=_full_bias(bias, q, k), compute_log_sumexp=True, dropout_p=0.0,
        is_causal=False, scale=scale,
    )[:4]  # fmt: skip
    _rng[("efficient", q.device)] = (seed, offset)
    return _checked(out, lse, q, v)


def _efficient_backward(dout, q, k, v, out, lse, scale, bias=None):
    seed, offset = _rng_state("efficient", q.device)
    padded = F.pad(lse.float(), (0, -lse.shape[-1] % 32))  # the forward's lse layout
    return _invoke(
        _aten._scaled_dot_product_efficient_attention_backward,
        grad_out=dout, query=q, key=k, value=v, attn_bias=_full_bias(bias, q, k), out=out,
        logsumexp=padded.contiguous(), philox_seed=seed, philox_offset=offset, dropout_p=0.0,
        grad_input_mask=[True, True, True, False], is_causal=False, scale=scale,
    )[:3]  # fmt: skip


def _cpu_flash_forward(q, k, v, scale, bias=None):
    out, lse = _invoke(
        _aten._scaled_dot_product_flash_attention_for_cpu,
        query=q, key=k, value=v, dropout_p=0.0, is_causal=False,
        attn_mask=None if bias is None else bias.to(q.dtype), scale=scale,
    )[:2]  # fmt: skip
    return _checked(out, lse, q, v)


def _cpu_flash_backward(dout, q, k, v, out, lse, scale, bias=None):
    return _invoke(
        _aten._scaled_dot_product_flash_attention_for_cpu_backward,
        grad_out=dout, query=q, key=k, value=v, out=out, logsumexp=lse, dropout_p=0.0,
        is_causal=False, attn_mask=None if bias is None else bias.to(q.dtype), scale=scale,
    )[:3]  # fmt: skip


# The exact math path --------------------------------------------------------------------


def math_chunks(
    batch_heads: int, q_len: int, k_len: int, budget: int | None = None
) -> tuple[int, int]:
    """Query and key chunk lengths whose scores (``batch_heads × q × k``) fit ``budget``
    elements (default :data:`MATH_CHUNK_ELEMENTS`): all keys at once where that leaves at
    least 64 queries a chunk, else 64 queries (or all, if fewer) and as many keys as fit."""
    rows = max(1, (budget or MATH_CHUNK_ELEMENTS) // batch_heads)
    min_queries = min(q_len, 64)
    if rows // k_len >= min_queries:
        return min(q_len, rows // k_len), k_len
    return min_queries, max(1, min(k_len, rows // min_queries))


def _bshd_empty(like: torch.Tensor, seq: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """``[B, H, seq, dim]`` in ``[B, S, H, D]`` memory, like the fused kernels' outputs."""
    b, h = like.shape[:2]
    return torch.empty(b, seq, h, dim, dtype=dtype, device=like.device).transpose(1, 2)


def _math_forward(q, k, v, scale, bias=None):
    dtype = _accumulate_dtype(q.dtype)
    (b, h, q_len, _), k_len = q.shape, k.shape[2]
    q_step, k_step = math_chunks(b * h, q_len, k_len)
    out = _bshd_empty(q, q_len, v.shape[-1], dtype)
    lse = q.new_empty(b, h, q_len, dtype=dtype)
    for i in range(0, q_len, q_step):
        rows = slice(i, i + q_step)
        qi = q[:, :, rows].to(dtype)
        merge = SoftmaxMerge()
        for j in range(0, k_len, k_step):
            scores = torch.matmul(qi, k[:, :, j : j + k_step].to(dtype).transpose(-2, -1))
            scores.mul_(scale)
            if bias is not None:
                scores.add_(bias[..., j : j + k_step].to(dtype))
            block_lse = torch.logsumexp(scores, dim=-1)
            probs = scores.sub_(block_lse.unsqueeze(-1)).exp_()
            part = torch.matmul(probs, v[:, :, j : j + k_step].to(dtype))
            merge.add(part, block_lse)
        out[:, :, rows], lse[:, :, rows] = merge.result()
    return out.to(q.dtype), lse


def _math_backward(dout, q, k, v, out, lse, scale, bias=None):
    dtype = _accumulate_dtype(q.dtype)
    (b, h, q_len, _), k_len = q.shape, k.shape[2]
    q_step, k_step = math_chunks(b * h, q_len, k_len)
    dq = _bshd_empty(q, q_len, q.shape[-1], dtype).zero_()
    dk = _bshd_empty(k, k_len, k.shape[-1], dtype).zero_()
    dv = _bshd_empty(v, k_len, v.shape[-1], dtype).zero_()
    for i in range(0, q_len, q_step):
        rows = slice(i, i + q_step)
        qi, doi = q[:, :, rows].to(dtype), dout[:, :, rows].to(dtype)
        delta = (doi * out[:, :, rows].to(dtype)).sum(-1, keepdim=True)
        lse_i = lse[:, :, rows].to(dtype).unsqueeze(-1)
        for j in range(0, k_len, k_step):
            cols = slice(j, j + k_step)
            kj, vj = k[:, :, cols].to(dtype), v[:, :, cols].to(dtype)
            scores = torch.matmul(qi, kj.transpose(-2, -1)) * scale
            if bias is not None:
                scores.add_(bias[..., cols].to(dtype))
            probs = scores.sub_(lse_i).exp_()
            dv[:, :, cols] += torch.matmul(probs.transpose(-2, -1), doi)
            dscores = probs.mul_(torch.matmul(doi, vj.transpose(-2, -1)).sub_(delta))
            dq[:, :, rows] += torch.matmul(dscores, kj).mul_(scale)
            dk[:, :, cols] += torch.matmul(dscores.transpose(-2, -1), qi).mul_(scale)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


_FORWARD: dict[str, Callable] = {name: globals()[f"_{name}_forward"] for name in BACKENDS}
_BACKWARD: dict[str, Callable] = {name: globals()[f"_{name}_backward"] for name in BACKENDS}
