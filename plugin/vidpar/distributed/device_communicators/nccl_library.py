"""``libnccl.so.2`` through ctypes: where it is found, the functions vidpar calls (declared
from NCCL's ``nccl.h``), every result checked, and the tables from torch's dtypes and
reduce ops to NCCL's enums.

The library is searched in order: the path in ``VIDPAR_NCCL_SO`` (when set, nothing
else), the nvidia-nccl wheel (``nvidia/nccl/lib/libnccl.so.2`` on ``sys.path``: the
library torch's CUDA wheels load), then the system's loader. NCCL older than
:data:`MIN_VERSION` is refused.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch.distributed import ReduceOp

logger = logging.getLogger(__name__)

ENV_VAR = "VIDPAR_NCCL_SO"
SONAME = "libnccl.so.2"
WHEEL_LIBRARY = Path("nvidia", "nccl", "lib", SONAME)
#: The oldest NCCL vidpar drives (ncclGetLastError, ncclAvg, bfloat16 and graph capture
#: are all older than this).
MIN_VERSION = (2, 18, 0)
UNIQUE_ID_BYTES = 128


class NcclUniqueId(ctypes.Structure):
    """``ncclUniqueId``: 128 opaque bytes, passed by value to ``ncclCommInitRank``."""

    _fields_ = [("internal", ctypes.c_byte * UNIQUE_ID_BYTES)]


class NcclLoadError(RuntimeError):
    """No usable NCCL library was found; the message names every place tried."""


class NcclError(RuntimeError):
    """An NCCL call returned a result other than ``ncclSuccess``."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


# ncclDataType_t and ncclRedOp_t (nccl.h), with the NCCL release that added each newer one.
DTYPES: dict[torch.dtype, int] = {
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
DTYPES_SINCE: dict[torch.dtype, tuple[int, int, int]] = {
    torch.bfloat16: (2, 10, 0),
    torch.float8_e4m3fn: (2, 24, 0),
    torch.float8_e5m2: (2, 24, 0),
}
REDUCE_OPS: dict[Any, int] = {
    ReduceOp.SUM: 0,
    ReduceOp.PRODUCT: 1,
    ReduceOp.MAX: 2,
    ReduceOp.MIN: 3,
    ReduceOp.AVG: 4,
}
REDUCE_OPS_SINCE: dict[Any, tuple[int, int, int]] = {ReduceOp.AVG: (2, 10, 0)}

_ptr, _int, _size = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
#: name -> (restype, argtypes). ncclComm_t and cudaStream_t are pointers; enums are ints.
SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "ncclGetVersion": (_int, [ctypes.POINTER(_int)]),
    "ncclGetErrorString": (ctypes.c_char_p, [_int]),
    "ncclGetLastError": (ctypes.c_char_p, [_ptr]),
    "ncclGetUniqueId": (_int, [ctypes.POINTER(NcclUniqueId)]),
    "ncclCommInitRank": (_int, [ctypes.POINTER(_ptr), _int, NcclUniqueId, _int]),
    "ncclCommDestroy": (_int, [_ptr]),
    "ncclCommAbort": (_int, [_ptr]),
    "ncclCommGetAsyncError": (_int, [_ptr, ctypes.POINTER(_int)]),
    # (sendbuff, recvbuff, count, datatype, op, comm, stream)
    "ncclAllReduce": (_int, [_ptr, _ptr, _size, _int, _int, _ptr, _ptr]),
    # (sendbuff, recvbuff, recvcount, datatype, op, comm, stream)
    "ncclReduceScatter": (_int, [_ptr, _ptr, _size, _int, _int, _ptr, _ptr]),
    # (sendbuff, recvbuff, sendcount, datatype, comm, stream)
    "ncclAllGather": (_int, [_ptr, _ptr, _size, _int, _ptr, _ptr]),
    # (sendbuff, recvbuff, count, datatype, root, comm, stream)
    "ncclBroadcast": (_int, [_ptr, _ptr, _size, _int, _int, _ptr, _ptr]),
    # (buff, count, datatype, peer, comm, stream)
    "ncclSend": (_int, [_ptr, _size, _int, _int, _ptr, _ptr]),
    "ncclRecv": (_int, [_ptr, _size, _int, _int, _ptr, _ptr]),
    "ncclGroupStart": (_int, []),
    "ncclGroupEnd": (_int, []),
}


def nccl_dtype(dtype: torch.dtype, version: tuple[int, int, int]) -> int | None:
    """NCCL's ``ncclDataType_t`` for ``dtype`` in NCCL ``version``, or ``None``."""
    if version < DTYPES_SINCE.get(dtype, (0, 0, 0)):
        return None
    return DTYPES.get(dtype)


def nccl_reduce_op(op: Any, version: tuple[int, int, int]) -> int | None:
    """NCCL's ``ncclRedOp_t`` for torch's ``ReduceOp`` ``op`` in ``version``, or ``None``."""
    try:
        if version < REDUCE_OPS_SINCE.get(op, (0, 0, 0)):
            return None
        return REDUCE_OPS.get(op)
    except TypeError:  # an unhashable ReduceOp object (e.g. a PREMUL_SUM with its factor)
        return None


def parse_version(code: int) -> tuple[int, int, int]:
    """``NCCL_VERSION_CODE`` -> ``(major, minor, patch)``: ``22809`` is 2.28.9; releases
    before 2.9 were coded ``major·1000 + minor·100 + patch`` (``2804`` is 2.8.4)."""
    if code >= 10000:
        return code // 10000, code // 100 % 100, code % 100
    return code // 1000, code // 100 % 10, code % 100


def version_text(version: tuple[int, int, int]) -> str:
    return ".".join(map(str, version))


@dataclass(frozen=True)
class Candidate:
    """One place to load the library from: where it came from, and the path."""

    source: str
    path: str


def candidates(explicit: str | None, search_path: Sequence[str] | None = None) -> list[Candidate]:
    """The places to try, in order: ``explicit`` (``VIDPAR_NCCL_SO``) alone when given;
    otherwise the nvidia-nccl wheel in every ``search_path`` entry (``sys.path``) that has
    one, then what the system's loader finds."""
    if explicit:
        return [Candidate(ENV_VAR, explicit)]
    found: list[Candidate] = []
    for entry in sys.path if search_path is None else search_path:
        path = Path(entry or ".") / WHEEL_LIBRARY
        if path.is_file():
            found.append(Candidate("nvidia-nccl wheel", str(path.resolve())))
    system = ctypes.util.find_library("nccl")
    if system and system != SONAME:
        found.append(Candidate("system (ldconfig)", system))
    found.append(Candidate("system loader", SONAME))
    unique: dict[str, Candidate] = {}
    for candidate in found:
        unique.setdefault(candidate.path, candidate)
    return list(unique.values())


class NcclLibrary:
    """A loaded ``libnccl.so.2`` with vidpar's functions declared; :meth:`call` checks the
    ``ncclResult_t`` of every call and raises :class:`NcclError` with NCCL's own words."""

    def __init__(self, cdll: ctypes.CDLL, path: str, source: str) -> None:
        self.path, self.source = path, source
        self.version = _library_version(cdll)
        if self.version < MIN_VERSION:
            raise NcclLoadError(
                f"NCCL {version_text(self.version)} is older than the "
                f"{version_text(MIN_VERSION)} vidpar needs"
            )
        self._functions: dict[str, Any] = {}
        for name, (restype, argtypes) in SIGNATURES.items():
            try:
                function = getattr(cdll, name)
            except AttributeError:
                raise NcclLoadError(f"{path} has no {name}") from None
            function.restype, function.argtypes = restype, argtypes
            self._functions[name] = function

    def __repr__(self) -> str:
        return f"NcclLibrary(NCCL {version_text(self.version)} from {self.path})"

    def call(self, name: str, *args: Any, comm: int | None = None) -> None:
        """``name(*args)``; raises :class:`NcclError` unless it returns ``ncclSuccess``."""
        code = self._functions[name](*args)
        if code != 0:
            raise NcclError(self.describe_failure(name, code, comm), code)

    def describe_failure(self, name: str, code: int, comm: int | None = None) -> str:
        text = self._functions["ncclGetErrorString"](code).decode(errors="replace")
        detail = self._functions["ncclGetLastError"](comm)
        message = f"{name} failed: {text} (ncclResult_t {code})"
        if detail:
            message += f"; NCCL says: {detail.decode(errors='replace')}"
        return message

    def dtype(self, dtype: torch.dtype) -> int | None:
        """This NCCL's ``ncclDataType_t`` for ``dtype``, or ``None``."""
        return nccl_dtype(dtype, self.version)

    def reduce_op(self, op: Any) -> int | None:
        """This NCCL's ``ncclRedOp_t`` for torch's reduce ``op``, or ``None``."""
        return nccl_reduce_op(op, self.version)

    # Communicators ------------------------------------------------------------------

    def unique_id(self) -> bytes:
        """A fresh ``ncclUniqueId`` (made once per communicator, on its first rank)."""
        uid = NcclUniqueId()
        self.call("ncclGetUniqueId", ctypes.byref(uid))
        return ctypes.string_at(ctypes.addressof(uid), UNIQUE_ID_BYTES)

    def init_rank(self, nranks: int, unique_id: bytes, rank: int) -> int:
        """``ncclCommInitRank`` on the current CUDA device; the communicator handle."""
        if len(unique_id) != UNIQUE_ID_BYTES:
            raise ValueError(f"an NCCL unique id has {UNIQUE_ID_BYTES} bytes, not {len(unique_id)}")
        comm = ctypes.c_void_p()
        uid = NcclUniqueId.from_buffer_copy(unique_id)
        self.call("ncclCommInitRank", ctypes.byref(comm), nranks, uid, rank)
        if not comm.value:
            raise NcclError("ncclCommInitRank returned no communicator", -1)
        return comm.value

    def async_error(self, comm: int) -> int:
        """The communicator's asynchronous ``ncclResult_t`` (0: healthy)."""
        result = ctypes.c_int()
        self.call("ncclCommGetAsyncError", comm, ctypes.byref(result), comm=comm)
        return result.value


def _library_version(cdll: ctypes.CDLL) -> tuple[int, int, int]:
    get_version = cdll.ncclGetVersion
    get_version.restype, get_version.argtypes = SIGNATURES["ncclGetVersion"]
    code = ctypes.c_int()
    if get_version(ctypes.byref(code)) != 0:
        raise NcclLoadError("ncclGetVersion failed")
    return parse_version(code.value)


def load_nccl() -> NcclLibrary:
    """The NCCL library (found once per ``VIDPAR_NCCL_SO`` value; its path and version
    are logged when it first loads). Raises :class:`NcclLoadError` naming every place
    tried when none gives a usable library."""
    return _load(os.environ.get(ENV_VAR) or None)


@cache
def _load(explicit: str | None) -> NcclLibrary:
    return load_from(candidates(explicit), explicit=bool(explicit))


def load_from(places: Sequence[Candidate], explicit: bool) -> NcclLibrary:
    """The first of ``places`` that loads as NCCL >= :data:`MIN_VERSION` with every
    function vidpar declares; otherwise :class:`NcclLoadError` naming each place and why
    it failed (``explicit``: the places came from ``VIDPAR_NCCL_SO``)."""
    tried = []
    for candidate in places:
        try:
            library = NcclLibrary(ctypes.CDLL(candidate.path), candidate.path, candidate.source)
        except (OSError, AttributeError, NcclLoadError) as err:
            tried.append(f"{candidate.source}: {candidate.path} ({err})")
            continue
        logger.info(
            "pynccl: NCCL %s from %s (%s)",
            version_text(library.version),
            library.path,
            library.source,
        )
        return library
    hint = (
        f"unset {ENV_VAR} to search the nvidia-nccl wheel and the system"
        if explicit
        else f"pip install nvidia-nccl-cu12 (or -cu13), or set {ENV_VAR} to a {SONAME}"
    )
    raise NcclLoadError(
        f"no usable NCCL library (NCCL >= {version_text(MIN_VERSION)}); tried:\n  "
        + "\n  ".join(tried)
        + f"\n{hint}"
    )
