"""CPU communicator: gloo, through torch.distributed."""

from vidpar.distributed.device_communicators.base import DeviceCommunicator


class CpuCommunicator(DeviceCommunicator):
    """gloo on CPU tensors; the base operations are already the right ones."""

    name = "gloo"
