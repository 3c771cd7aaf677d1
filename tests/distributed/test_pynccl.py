"""pynccl without a GPU: finding libnccl.so.2 and the error naming every place tried, the
ctypes declarations against the library's own nccl.h, the dtype and reduce-op tables,
NCCL's errors in NCCL's words, and the unique id shared over a real gloo world. The
library is the real one where installed (the nvidia-nccl wheel or ``VIDPAR_NCCL_SO``);
tests needing it skip elsewhere. The GPU side is tests/distributed/test_pynccl_gpu.py."""

from __future__ import annotations

import ctypes
import logging
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed import ReduceOp

from vidpar.distributed import state as ps
from vidpar.distributed.device_communicators import nccl_library as nl
from vidpar.distributed.device_communicators.nccl_library import (
    Candidate,
    NcclError,
    NcclLibrary,
    NcclLoadError,
    candidates,
    load_from,
    load_nccl,
    nccl_dtype,
    nccl_reduce_op,
    parse_version,
)
from vidpar.distributed.device_communicators.pynccl import PyNcclCommunicator, share_unique_id


def _real_library() -> NcclLibrary | None:
    try:
        return load_nccl()
    except NcclLoadError:
        return None


LIBRARY = _real_library()
needs_library = pytest.mark.skipif(
    LIBRARY is None, reason="no libnccl.so.2 (pip install nvidia-nccl-cu12/-cu13 to run these)"
)

# CPU: discovery, declarations, tables, errors -----------------------------------------


def test_version_codes_both_encodings() -> None:
    assert parse_version(22809) == (2, 28, 9)
    assert parse_version(23007) == (2, 30, 7)
    assert parse_version(21003) == (2, 10, 3)
    assert parse_version(2804) == (2, 8, 4)  # releases before 2.9: major·1000 + minor·100


def test_discovery_order_env_then_wheels_then_system(tmp_path: Path) -> None:
    sites = [tmp_path / "a", tmp_path / "no_wheel", tmp_path / "b"]
    for site in sites:
        site.mkdir()
    for site in (sites[0], sites[2]):
        lib = site / nl.WHEEL_LIBRARY
        lib.parent.mkdir(parents=True)
        lib.write_bytes(b"")
    found = candidates(None, [str(s) for s in sites] + [str(sites[0])])
    assert [c.source for c in found[:2]] == ["nvidia-nccl wheel"] * 2
    assert [c.path for c in found[:2]] == [
        str((site / nl.WHEEL_LIBRARY).resolve()) for site in (sites[0], sites[2])
    ]
    assert found[-1] == Candidate("system loader", "libnccl.so.2")
    assert all(c.source.startswith("system") for c in found[2:])
    assert candidates("/opt/my/libnccl.so.2", [str(sites[0])]) == [
        Candidate("VIDPAR_NCCL_SO", "/opt/my/libnccl.so.2")
    ]


def test_a_missing_vidpar_nccl_so_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setenv("VIDPAR_NCCL_SO", "/no/such/dir/libnccl.so.2")
    with pytest.raises(NcclLoadError) as err:
        load_nccl()
    text = str(err.value)
    assert "VIDPAR_NCCL_SO: /no/such/dir/libnccl.so.2" in text
    assert "No such file" in text
    assert "unset VIDPAR_NCCL_SO" in text and ">= 2.18" in text


def test_the_error_names_everything_tried(tmp_path: Path) -> None:
    empty = tmp_path / "libnccl.so.2"
    empty.write_bytes(b"")  # not a shared object
    tried = [
        Candidate("nvidia-nccl wheel", str(empty)),
        Candidate("system loader", "libc.so.6"),  # a real library, but not NCCL
        Candidate("system loader", str(tmp_path / "absent.so")),
    ]
    with pytest.raises(NcclLoadError) as err:
        load_from(tried, explicit=False)
    lines = str(err.value).splitlines()
    assert f"nvidia-nccl wheel: {empty}" in lines[1]
    assert "libc.so.6" in lines[2] and "ncclGetVersion" in lines[2]
    assert "absent.so" in lines[3]
    assert "pip install nvidia-nccl-cu12" in lines[-1]


def test_dtype_and_reduce_op_tables() -> None:
    new = (2, 28, 9)
    expect = {
        torch.int8: 0,
        torch.uint8: 1,
        torch.int32: 2,
        torch.int64: 4,
        torch.float16: 6,
        torch.float32: 7,
        torch.float64: 8,
        torch.bfloat16: 9,
        torch.float8_e4m3fn: 10,
        torch.float8_e5m2: 11,
    }
    assert {d: nccl_dtype(d, new) for d in expect} == expect
    for missing in (torch.bool, torch.complex64, torch.int16, torch.float8_e4m3fnuz):
        assert nccl_dtype(missing, new) is None
    assert nccl_dtype(torch.float8_e4m3fn, (2, 23, 4)) is None  # fp8 came with NCCL 2.24
    assert nccl_dtype(torch.bfloat16, (2, 9, 9)) is None
    ops = {ReduceOp.SUM: 0, ReduceOp.PRODUCT: 1, ReduceOp.MAX: 2, ReduceOp.MIN: 3}
    assert {op: nccl_reduce_op(op, new) for op in ops} == ops
    assert nccl_reduce_op(ReduceOp.AVG, new) == 4
    assert nccl_reduce_op(ReduceOp.AVG, (2, 9, 6)) is None  # ncclAvg came with 2.10
    assert nccl_reduce_op(ReduceOp.BAND, new) is None
    assert nccl_reduce_op(dist._make_nccl_premul_sum(2.0), new) is None


def test_pynccl_needs_a_cuda_device() -> None:
    with pytest.raises(ValueError, match="needs a CUDA device"):
        PyNcclCommunicator(None, [0], 0, torch.device("cpu"), library=LIBRARY)


# CPU, with the real library ----------------------------------------------------------


def _header(library: NcclLibrary) -> str:
    header = Path(library.path).parent.parent / "include" / "nccl.h"
    if not header.is_file():
        pytest.skip(f"no nccl.h beside {library.path}")
    return header.read_text()


def _kind(c_type: str) -> str:
    c_type = c_type.strip()
    if "*" in c_type or c_type.split()[0] in ("ncclComm_t", "cudaStream_t"):
        return "pointer"
    if c_type.startswith("size_t"):
        return "size_t"
    if c_type.startswith("ncclUniqueId"):
        return "unique id"
    assert c_type.split()[0] in ("int", "ncclDataType_t", "ncclRedOp_t", "ncclResult_t"), c_type
    return "int"


def _ctypes_kind(t) -> str:
    if t is ctypes.c_size_t:
        return "size_t"
    if t is nl.NcclUniqueId:
        return "unique id"
    if t is ctypes.c_int:
        return "int"
    return "pointer"


@needs_library
def test_declarations_match_the_librarys_own_header() -> None:
    """Every function vidpar declares has the return type and parameters of nccl.h;
    every enum value vidpar uses is the header's."""
    text = re.sub(r"/\*.*?\*/", "", _header(LIBRARY), flags=re.S)
    for name, (restype, argtypes) in nl.SIGNATURES.items():
        match = re.search(rf"(ncclResult_t|const char\*)\s+{name}\s*\(([^)]*)\)\s*;", text)
        assert match, name
        assert (match.group(1) == "const char*") == (restype is ctypes.c_char_p), name
        params = [p for p in match.group(2).split(",") if p.strip() not in ("", "void")]
        assert [_kind(p) for p in params] == [_ctypes_kind(t) for t in argtypes], name
    names = {
        torch.int8: "ncclInt8",
        torch.uint8: "ncclUint8",
        torch.int32: "ncclInt32",
        torch.int64: "ncclInt64",
        torch.float16: "ncclFloat16",
        torch.float32: "ncclFloat32",
        torch.float64: "ncclFloat64",
        torch.bfloat16: "ncclBfloat16",
        torch.float8_e4m3fn: "ncclFloat8e4m3",
        torch.float8_e5m2: "ncclFloat8e5m2",
    }
    for dtype, code in nl.DTYPES.items():
        assert re.search(rf"\b{names[dtype]}\s*=\s*{code}\b", text), dtype
    for op, name in zip(nl.REDUCE_OPS, ("Sum", "Prod", "Max", "Min", "Avg"), strict=True):
        assert re.search(rf"\bnccl{name}\s*=\s*{nl.REDUCE_OPS[op]}\b", text), op
    assert re.search(rf"NCCL_UNIQUE_ID_BYTES\s+{nl.UNIQUE_ID_BYTES}\b", text)


@needs_library
def test_the_real_library_loads_once_and_logs_it(caplog) -> None:
    assert LIBRARY.version >= nl.MIN_VERSION
    nl._load.cache_clear()
    caplog.set_level(logging.INFO, logger=nl.__name__)
    first, second = load_nccl(), load_nccl()
    assert first is second
    logged = [r.getMessage() for r in caplog.records if r.name == nl.__name__]
    version = nl.version_text(first.version)
    assert logged == [f"pynccl: NCCL {version} from {first.path} ({first.source})"]
    assert len(first.unique_id()) == nl.UNIQUE_ID_BYTES


@needs_library
def test_nccl_errors_are_raised_with_ncclGetErrorString() -> None:
    with pytest.raises(NcclError) as err:
        LIBRARY.call("ncclAllReduce", None, None, 1, 7, 0, None, None)
    assert err.value.code == 4
    assert "ncclAllReduce failed: invalid argument" in str(err.value)
    assert "NCCL says" in str(err.value)  # ncclGetLastError's detail


@needs_library
@pytest.mark.skipif(torch.cuda.is_available(), reason="tests NCCL's error without a GPU")
def test_init_without_a_gpu_fails_with_nccls_reason() -> None:
    with pytest.raises(NcclError, match="ncclCommInitRank failed"):
        LIBRARY.init_rank(1, LIBRARY.unique_id(), 0)


def _shared_unique_id(path: str) -> bytes:
    library = NcclLibrary(ctypes.CDLL(path), path, "test")
    group = ps.get_world_group()
    return share_unique_id(library, group.cpu_group, group.ranks, group.rank_in_group)


@needs_library
def test_the_unique_id_is_made_once_and_shared_over_gloo(worlds) -> None:
    ids = worlds(2).run(_shared_unique_id, LIBRARY.path)
    assert len(ids[0]) == nl.UNIQUE_ID_BYTES and any(ids[0])
    assert ids[0] == ids[1]
