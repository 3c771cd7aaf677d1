"""The plain-torch core: process groups, collectives, communicators, telemetry."""

from vidpar.distributed.parallel_state import (
    GroupCoordinator,
    destroy_distributed_environment,
    destroy_model_parallel,
    get_cfg_group,
    get_device_mesh,
    get_dp_group,
    get_parallel_config,
    get_ring_group,
    get_sp_group,
    get_tp_group,
    get_ulysses_group,
    get_world_group,
    init_distributed_environment,
    initialize_model_parallel,
    parallel_context,
)

__all__ = [
    "GroupCoordinator",
    "destroy_distributed_environment",
    "destroy_model_parallel",
    "get_cfg_group",
    "get_device_mesh",
    "get_dp_group",
    "get_parallel_config",
    "get_ring_group",
    "get_sp_group",
    "get_tp_group",
    "get_ulysses_group",
    "get_world_group",
    "init_distributed_environment",
    "initialize_model_parallel",
    "parallel_context",
]
