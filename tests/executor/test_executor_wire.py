"""The Executor's named messages through its wire, without a worker: bulk tensors out of
band (shared memory, no copy on the receiving side), errors with their exception."""

from __future__ import annotations

import gc
import multiprocessing as mp
import os

import numpy as np
import pytest
import torch

from vidpar.executor import shared_buffers
from vidpar.executor.errors import RemoteError, remote_error
from vidpar.executor.shared_buffers import shared_empty
from vidpar.executor.wire import (
    OOB_MIN_BYTES,
    Channel,
    ErrorReply,
    ExceptionInfo,
    Reply,
    Request,
    Shutdown,
    close_all,
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
    frame, fds = encode(request)
    assert len(fds) == 1 and len(frame) < OOB_MIN_BYTES  # the tensor is in shared memory
    close_all(fds)
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


def test_a_shared_buffer_crosses_as_its_own_memory_not_a_copy(channels):
    worker_end, executor_end = channels
    frames = shared_empty((4, 64, 1024), torch.float32)  # 1 MiB
    frames.copy_(torch.arange(frames.numel(), dtype=torch.float32).view_as(frames))
    ordinary = torch.arange(OOB_MIN_BYTES, dtype=torch.float64)  # through a memfd of its own
    value = {"frames": frames.numpy(), "half": frames[2:], "ordinary": ordinary}
    frame, fds = encode(Reply(1, value))
    try:
        # the message's own memfd (the ordinary tensor) and the shared buffer's, once for
        # its two views; the second is the shared buffer itself
        assert len(fds) == 2 and len(frame) < OOB_MIN_BYTES
        key, _ = shared_buffers.shared_region(memoryview(frames.numpy()).cast("B"))
        shared_fd = shared_buffers.shared_descriptor(key)
        assert os.fstat(fds[1]).st_ino == os.fstat(shared_fd).st_ino
        worker_end.send_encoded(frame, fds)
    finally:
        close_all(fds)
    got = executor_end.recv().value
    np.testing.assert_array_equal(got["frames"], frames.numpy())
    assert torch.equal(got["half"], frames[2:]) and torch.equal(got["ordinary"], ordinary)
    # No copy: a page the receiver has not written shows the sender's later write (which
    # real senders must not do), and the two views share the received memory.
    frames[3, 0, 0] = -1.0
    assert got["frames"][3, 0, 0] == -1.0 and got["half"][1, 0, 0] == -1.0
    got["frames"][0, 0, 0] = 7.0  # the receiver's writes stay its own (copy-on-write)
    assert frames[0, 0, 0] == 0.0


def test_a_shared_buffer_is_released_with_its_last_tensor():
    before = shared_buffers.live_shared_buffers()
    frames = shared_empty((2, 3), torch.float64)
    view = frames[1]
    assert shared_buffers.live_shared_buffers() == before + 1
    del frames
    gc.collect()
    assert shared_buffers.live_shared_buffers() == before + 1  # the view still holds it
    del view
    gc.collect()
    assert shared_buffers.live_shared_buffers() == before
    assert shared_empty((0, 5), torch.float32).shape == (0, 5)  # nothing to share
