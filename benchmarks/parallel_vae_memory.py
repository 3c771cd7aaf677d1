"""Per-rank peak activation memory of ``vidpar.models.parallelize_vae`` decoding on CPU.

A diffusers ``AutoencoderKLWan`` with Wan2.1's architecture (three levels, 8× in space,
4× in time) at a reduced width, random weights, decodes the same latents whole in one
process and split in rows over gloo worlds of 2 and 4 (``parallel_context``, one process
per rank). Each rank counts the bytes of the tensor storages created during its
``decode`` that are alive at once (a ``TorchDispatchMode`` that adds a storage when an op
first outputs it and subtracts it when the storage is freed), and reports the peak: the
activations, the frame cache, the halo and gathered buffers and the whole output that
every rank returns; not the weights and latents that exist before, and not scratch
memory that a kernel allocates and frees inside one op. The split decode is also checked
against the whole one. Prints a table and writes JSON::

    python benchmarks/parallel_vae_memory.py benchmarks/results/2026-12-07_cpu_parallel_vae_memory.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import socket
import statistics
import sys
import tempfile
import weakref
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from vidpar.benchmarks.common import host_info

#: Wan2.1's VAE layout (the diffusers defaults) at a CPU-feasible width.
VAE_CONFIG = {
    "base_dim": 16,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
}


class LiveStorageBytes(TorchDispatchMode):
    """Tracks the bytes of tensor storages first output by an op inside the mode, while
    they live; ``peak`` is the largest total seen at an op boundary."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            id(t.untyped_storage())
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = id(storage)
            if key in inputs or key in self._seen:
                continue
            self._seen.add(key)
            self.live += storage.nbytes()
            weakref.finalize(storage, self._free, key, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


def measure_decode(vae, latents: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Peak live bytes of one ``vae.decode(latents)`` and its output."""
    with torch.no_grad(), LiveStorageBytes() as tracker:
        out = vae.decode(latents).sample
    return tracker.peak, out


def _load(path: str):
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan.from_pretrained(path).eval()


def _latents(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(1))


def _rank(rank: int, world: int, port: int, path: str, shape, runs: int, results) -> None:
    torch.set_num_threads(1)
    from vidpar.config import ParallelConfig
    from vidpar.distributed import parallel_context
    from vidpar.models import parallelize_vae

    with parallel_context(
        ParallelConfig(sp=world),
        world_size=world,
        rank=rank,
        init_method=f"tcp://127.0.0.1:{port}",
        backend="gloo",
    ):
        vae = parallelize_vae(_load(path))
        latents = _latents(shape)
        peaks = []
        for _ in range(runs):
            peak, out = measure_decode(vae, latents)
            peaks.append(peak)
        # numpy: pickled by value (a tensor would be shared memory that dies with us)
        results.put((rank, peaks, out.numpy() if rank == 0 else None))


def run_world(world: int, path: str, shape, runs: int) -> tuple[list[list[int]], torch.Tensor]:
    """Every rank's peaks of ``runs`` split decodes, and rank 0's output."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_rank, args=(r, world, port, path, shape, runs, results))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    gathered = [results.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"a rank of the world of {world} exited with {p.exitcode}")
    gathered.sort(key=lambda item: item[0])
    return [peaks for _, peaks, _ in gathered], torch.from_numpy(gathered[0][2])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="where to write the JSON results")
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--runs", type=int, default=3, help="decodes measured per world")
    parser.add_argument("--latent", type=int, nargs=5, default=[1, 16, 3, 18, 16], help="B C T H W")
    args = parser.parse_args()
    torch.set_num_threads(1)
    shape = tuple(args.latent)
    with tempfile.TemporaryDirectory() as folder:
        from diffusers import AutoencoderKLWan

        torch.manual_seed(0)
        AutoencoderKLWan(**VAE_CONFIG).save_pretrained(folder)
        vae = _load(folder)
        latents = _latents(shape)
        single = [measure_decode(vae, latents) for _ in range(args.runs)]
        reference = single[0][1]
        one = statistics.median(peak for peak, _ in single)
        rows = [{"world": 1, "peak_mib": one / 2**20, "ratio": 1.0, "max_abs_error": 0.0}]
        for world in args.worlds:
            per_rank, out = run_world(world, folder, shape, args.runs)
            busiest = statistics.median(max(run) for run in zip(*per_rank, strict=True))
            error = (out - reference).abs().max().item()
            rows.append(
                {
                    "world": world,
                    "peak_mib": busiest / 2**20,
                    "ratio": busiest / one,
                    "max_abs_error": error,
                    "per_rank_mib": [statistics.median(p) / 2**20 for p in per_rank],
                }
            )
    print(f"latents {list(shape)} -> video {list(reference.shape)}, float32")
    print(f"{'world':>5} {'peak MiB (busiest rank)':>24} {'× one process':>14} {'max |err|':>10}")
    for row in rows:
        print(
            f"{row['world']:>5} {row['peak_mib']:>24.1f} {row['ratio']:>14.3f} "
            f"{row['max_abs_error']:>10.2e}"
        )
    report = {
        "benchmark": "parallel_vae_decode_peak_memory",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": host_info("cpu"),
        "versions": _versions(),
        "vae_config": VAE_CONFIG,
        "latent": list(shape),
        "video": list(reference.shape),
        "runs": args.runs,
        "measure": "peak bytes of live tensor storages created during decode "
        "(TorchDispatchMode), median over runs of the busiest rank",
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


def _versions() -> dict[str, str]:
    import diffusers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__}


if __name__ == "__main__":
    main()
