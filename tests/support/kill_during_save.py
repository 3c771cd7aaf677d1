"""Harness of test_checkpoint_kill.py: SIGKILL a real sharded save at each of its file
operations and check what resume and vidpar-generate find on disk afterwards.

``python kill_during_save.py OUT --world 2 --tp 2 --keep-last 1 [--legacy]`` prints a
JSON report. One process (this one) imports torch once and forks every job: the ranks of
a gloo world that save the tiny DiT with ``save_sharded``, in a process group of their
own. A first job writes the old checkpoint (weights of seed 1; with ``--legacy`` turned
into an older vidpar's plain directory without manifest), a second one records every
rank's file operations while saving the new one (seed 2). Then, for each operation of
each rank, a fresh copy of the old checkpoint is saved over again with that rank armed
to kill the whole job (``os.killpg``, SIGKILL) just before the operation, or, at the
fsync of a file, after cutting the file to half its size (a write torn by the kill).
After each kill this process resolves the checkpoint as resume does, checks its files
against the manifest, asks ``vidpar-generate``'s finder, loads it with ``load_sharded``
and compares every weight with the old and the new ones; then one more save (seed 3)
must succeed and leave no partial behind.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

# Imported by the first DTensor and the first DCP save otherwise: once here, not per job.
import torch._dynamo
import torch.distributed.checkpoint._fsspec_filesystem

from vidpar.cli.validation_generate import find_checkpoint
from vidpar.config import ParallelConfig
from vidpar.distributed import checkpoint_store as store
from vidpar.distributed import state as ps
from vidpar.distributed.checkpoint import load_sharded, save_sharded
from vidpar.distributed.checkpoint_integrity import MANIFEST, CorruptCheckpointError, verify
from vidpar.distributed.full_weights import load_full_state_dict
from vidpar.nn.dit import DiTConfig, VideoDiT

TINY = DiTConfig(
    in_channels=3, patch_size=(1, 2, 2), hidden_size=32, num_heads=4, depth=1, num_classes=4
)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_AUDITED = {"open", "os.rename", "os.remove", "os.rmdir", "os.symlink", "os.mkdir"}


def weights(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in VideoDiT(TINY).state_dict().items()}


class FileOps:
    """Counts one rank's file operations (audit events, and fsync); armed, kills the job at
    operation ``kill_at`` (``torn``: cuts the file to half first)."""

    def __init__(self, directory: Path, kill_at: int | None = None, torn: bool = False) -> None:
        self.directory = str(directory.resolve())
        self.kill_at, self.torn = kill_at, torn
        self.ops: list[str] = []
        self.active = False

    def install(self) -> None:
        sys.addaudithook(self._audit)
        real_fsync = os.fsync

        def fsync(fd) -> None:
            if self.active:
                fd = fd if isinstance(fd, int) else fd.fileno()
                name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
                kind = "fsync file" if os.path.isfile(f"/proc/self/fd/{fd}") else "fsync dir"
                self._op(f"{kind} {name}", fd)
            real_fsync(fd)

        os.fsync = fsync

    def _audit(self, event: str, args: tuple) -> None:
        if not self.active or event not in _AUDITED:
            return
        path = args[0]
        if event == "open":
            mode, flags = args[1], args[2]
            writes = any(c in mode for c in "wax+") if isinstance(mode, str) else None
            if writes is None:
                writes = isinstance(flags, int) and bool(flags & _WRITE_FLAGS)
            if not writes or isinstance(path, int):
                return
        path = os.fsdecode(path) if not isinstance(path, int) else str(path)
        if os.path.isabs(path) and not path.startswith(self.directory):
            return  # not the checkpoint's (relative paths: rmtree's, under a dir fd)
        target = f" -> {os.path.basename(os.fsdecode(args[1]))}" if event == "os.rename" else ""
        self._op(f"{event} {os.path.basename(path)}{target}")

    def _op(self, description: str, fd: int | None = None) -> None:
        self.ops.append(description)
        if len(self.ops) - 1 != self.kill_at:
            return
        if self.torn and fd is not None:  # by path: the fd may be read-only
            os.truncate(f"/proc/self/fd/{fd}", os.fstat(fd).st_size // 2)
        os.killpg(os.getpgrp(), signal.SIGKILL)


def run_rank(rank: int, args, ckpt: Path, seed: int, rendezvous: Path, ops: FileOps | None):
    ps.init_distributed_environment(
        world_size=args.world,
        rank=rank,
        local_rank=rank,
        init_method=f"file://{rendezvous}",
        backend="gloo",
    )
    ps.initialize_model_parallel(ParallelConfig(tp=args.tp))
    model = VideoDiT(TINY)
    load_full_state_dict(model, WEIGHTS[seed])
    if ops is not None:
        ops.install()
        ops.active = True
    save_sharded(ckpt, model, [], {"seed": seed}, keep_last=args.keep_last)
    if ops is not None:
        ops.active = False
        ops_file = ckpt.parent.parent / f"ops{rank}.json"
        ops_file.write_text(json.dumps(ops.ops))


def job(args, ckpt: Path, seed: int, arm: tuple[int, int, bool] | None = None, record=False):
    """Fork the ranks of one save; returns each rank's end (``"ok"``, ``"killed"``, ...)."""
    rendezvous = ckpt.parent.parent / f"rendezvous-{seed}-{time.monotonic_ns()}"
    log = ckpt.parent.parent / f"job-{seed}.log"
    pids: list[int] = []
    for rank in range(args.world):
        pid = os.fork()
        if pid == 0:  # a rank
            code = 1
            try:
                os.setpgid(0, pids[0] if pids else 0)
                out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
                os.dup2(out, 1)
                os.dup2(out, 2)
                ops = None
                if arm is not None and arm[0] == rank:
                    ops = FileOps(ckpt.parent, kill_at=arm[1], torn=arm[2])
                elif record:
                    ops = FileOps(ckpt.parent)
                run_rank(rank, args, ckpt, seed, rendezvous, ops)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        with contextlib.suppress(PermissionError, ProcessLookupError):  # the child was first
            os.setpgid(pid, pids[0] if pids else pid)
        pids.append(pid)
    ends: dict[int, str] = {}
    deadline = time.monotonic() + 120
    while len(ends) < len(pids):
        for rank, pid in enumerate(pids):
            if rank in ends:
                continue
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                if os.WIFSIGNALED(status):
                    ends[rank] = "killed" if os.WTERMSIG(status) == signal.SIGKILL else "signal"
                else:
                    ends[rank] = "ok" if os.WEXITSTATUS(status) == 0 else "failed"
        if time.monotonic() > deadline:
            os.killpg(pids[0], signal.SIGKILL)
            deadline = float("inf")  # reaped next round
        time.sleep(0.005)
    return [ends[r] for r in range(len(pids))]


def found(root: Path) -> dict:
    """What resume and vidpar-generate find under ``root``, and whether it is one save."""
    ckpt = root / "checkpoints" / "last.ckpt"
    resolved = store.resolve(ckpt)
    if resolved is None:
        return {"seed": None, "problem": "no complete checkpoint"}
    trust = not (resolved / MANIFEST).exists()  # an older vidpar's: trusted, as its user would
    try:
        verify(resolved, trust=trust)
    except CorruptCheckpointError as err:
        return {"seed": None, "problem": str(err)}
    if (given := find_checkpoint(None, str(root), trust)) != resolved:
        return {"seed": None, "problem": f"vidpar-generate found {given}"}
    with ps.single_process():
        model = VideoDiT(TINY)
        seed = load_sharded(ckpt, model, [], trust=trust)["seed"]
    mixed = [k for k, v in model.state_dict().items() if not torch.equal(v, WEIGHTS[seed][k])]
    problem = f"weights of another save: {mixed[:3]}" if mixed else None
    return {"seed": seed, "problem": problem, "version": resolved.name}


def legacy(ckpt: Path) -> None:
    """Turn the checkpoint into what an older vidpar wrote: a plain directory, no manifest."""
    version = store.resolve(ckpt)
    ckpt.unlink()
    version.rename(ckpt)
    (ckpt / MANIFEST).unlink()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--keep-last", type=int, default=1)
    parser.add_argument("--legacy", action="store_true")
    args = parser.parse_args()
    template = args.out / "template"
    (template / "checkpoints").mkdir(parents=True)
    ends = job(args, template / "checkpoints" / "last.ckpt", seed=1)
    assert ends == ["ok"] * args.world, (ends, (template / "job-1.log").read_text())
    if args.legacy:
        legacy(template / "checkpoints" / "last.ckpt")
    recording = args.out / "recording"
    shutil.copytree(template, recording, symlinks=True)
    ends = job(args, recording / "checkpoints" / "last.ckpt", seed=2, record=True)
    assert ends == ["ok"] * args.world, (ends, (recording / "job-2.log").read_text())
    ops = [json.loads((recording / f"ops{r}.json").read_text()) for r in range(args.world)]
    points = []
    for rank, rank_ops in enumerate(ops):
        for k, op in enumerate(rank_ops):
            points.append((rank, k, False, op))
            if op.startswith("fsync file"):
                points.append((rank, k, True, f"{op} (torn)"))
    report = {"ops": ops, "points": []}
    for i, (rank, k, torn, op) in enumerate(points):
        root = args.out / f"point{i}"
        shutil.copytree(template, root, symlinks=True)
        ends = job(args, root / "checkpoints" / "last.ckpt", seed=2, arm=(rank, k, torn))
        entry = {"rank": rank, "op": op, "ends": ends, **found(root)}
        entry["partials"] = [
            p.name for p in (root / "checkpoints").iterdir() if ".partial-" in p.name
        ]
        again = job(args, root / "checkpoints" / "last.ckpt", seed=3)
        after = found(root)
        left = [p.name for p in (root / "checkpoints").iterdir() if ".partial-" in p.name]
        log = (root / "job-3.log").read_text()
        entry["after"] = {
            "ends": again,
            "seed": after["seed"],
            "problem": after["problem"],
            "partials_left": left,
            "versions": len(store.versions(root / "checkpoints" / "last.ckpt")),
            "swept_line": "partial checkpoint file(s) left by interrupted saves" in log,
        }
        report["points"].append(entry)
        shutil.rmtree(root)
    json.dump(report, sys.stdout)


WEIGHTS = {seed: weights(seed) for seed in (1, 2, 3)}

if __name__ == "__main__":
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    main()
