"""The Executor's named messages through its wire, without a worker: bulk tensors out of
band (shared memory, no copy on the receiving side), errors with their exception."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

from vidpar.executor.errors import RemoteError, remote_error
from vidpar.executor.wire import (
    OOB_MIN_BYTES,
    Channel,
    ErrorReply,
    ExceptionInfo,
    Reply,
    Request,
    Shutdown,
    encode,
)


@pytest.fixture
def channels():
    """Both ends of one control connection, as the Executor and a worker hold them."""
    parent, child = mp.Pipe(duplex=True)
    ends = Channel(parent), Channel(child)
    yield ends
    for end in ends:
        end.close()


def _scale(worker, x):
    return x * 2


def test_a_request_carries_its_tensors_out_of_band(channels):
    sender, receiver = channels
    big = torch.arange(OOB_MIN_BYTES, dtype=torch.float64)
    request = Request(7, _scale, (big,), {"note": "n"})
    frame, fd = encode(request)
    assert fd is not None and len(frame) < OOB_MIN_BYTES  # the tensor is in shared memory
    sender.send(request)
    got = receiver.recv()
    assert isinstance(got, Request) and (got.seq, got.name) == (7, "_scale")
    assert got.method is _scale and got.kwargs == {"note": "n"}
    (tensor,) = got.args
    assert torch.equal(tensor, big)
    sender.send(Shutdown())
    assert receiver.recv() == Shutdown()


def test_replies_and_errors_cross_by_name(channels):
    worker_end, executor_end = channels
    worker_end.send(Reply(3, {"x": torch.ones(2)}))
    reply = executor_end.recv()
    assert reply.seq == 3 and torch.equal(reply.value["x"], torch.ones(2))

    try:
        raise KeyError("missing")
    except KeyError as exc:
        info = ExceptionInfo.of(exc)
    worker_end.send(ErrorReply(4, info))
    answer = executor_end.recv()
    assert isinstance(answer, ErrorReply) and answer.seq == 4
    assert answer.error.exc_type == "KeyError" and "missing" in answer.error.traceback
    assert isinstance(answer.error.exception(), KeyError)
    err = remote_error({1: answer.error}, "in a test")
    assert isinstance(err, RemoteError) and err.rank == 1 and err.exc_type == "KeyError"
    assert isinstance(err.exception, KeyError)
