"""Data-parallel training under torchrun: the process group and the few collectives `fit` needs.

`modeltrain fit` runs inside `distributed_session()`. Outside torchrun (no `WORLD_SIZE` in the
environment, or `WORLD_SIZE=1`) the session is a single-process context that touches nothing, so a plain
run trains exactly as before. Under torchrun every process joins one group: nccl with one GPU per process
(`cuda:LOCAL_RANK`) when every local rank has a GPU, gloo on the CPU otherwise.

Every collective here is a no-op in a single-process context, so callers need no `if`.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from trainer.errors import ConfigError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "gloo", "nccl")
# How long a rank waits in a collective for the others (rank 0 exporting alone takes seconds, not minutes).
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
# cuBLAS needs this to honour `torch.use_deterministic_algorithms(True)`; set before CUDA starts.
CUBLAS_WORKSPACE = ":4096:8"


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job.

    Attributes:
        rank: global rank (0 is the main process, the only one that exports).
        local_rank: rank on this machine (picks the GPU).
        world_size: number of processes training together.
        backend: `gloo` or `nccl`; None for a single process without a process group.
        device: where this process trains (`cpu`, or `cuda:LOCAL_RANK` with nccl).
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        """True when several processes train one model (DDP, sharded data)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, which logs, shows progress and exports."""
        return self.rank == 0


SINGLE_PROCESS = DistContext()


@dataclass(frozen=True)
class TorchrunEnv:
    """The variables torchrun sets for each worker."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int


def torchrun_env(environ: Mapping[str, str] | None = None) -> TorchrunEnv | None:
    """The torchrun worker variables, or None when this process was not started by torchrun.

    Raises:
        ConfigError: the variables are present but not consistent integers.
    """
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env:
        return None
    try:
        world_size = int(env["WORLD_SIZE"])
        rank = int(env.get("RANK", "0"))
        local_rank = int(env.get("LOCAL_RANK", str(rank)))
        local_world_size = int(env.get("LOCAL_WORLD_SIZE", str(world_size)))
    except ValueError as err:
        raise ConfigError(f"torchrun environment is not numeric: {err}") from err
    if world_size < 1 or not 0 <= rank < world_size or not 0 <= local_rank < local_world_size:
        raise ConfigError(
            f"torchrun environment is inconsistent: RANK={rank} LOCAL_RANK={local_rank} "
            f"WORLD_SIZE={world_size} LOCAL_WORLD_SIZE={local_world_size}"
        )
    return TorchrunEnv(rank, local_rank, world_size, local_world_size)


def launched_by_torchrun(environ: Mapping[str, str] | None = None) -> bool:
    """True when torchrun started this process as one of several workers."""
    env = torchrun_env(environ)
    return env is not None and env.world_size > 1


def choose_backend(requested: str, local_rank: int, local_world_size: int) -> tuple[str, torch.device]:
    """The process-group backend and this rank's device.

    `auto` takes nccl when CUDA has a GPU for every local rank, gloo on the CPU otherwise
    (two ranks cannot share one GPU under nccl).

    Raises:
        ConfigError: an unknown backend, or nccl without a GPU for every local rank.
    """
    if requested not in BACKENDS:
        raise ConfigError(f"unknown backend {requested!r}; choose one of {', '.join(BACKENDS)}")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    enough_gpus = gpus >= local_world_size
    if requested == "nccl" and not (enough_gpus and dist.is_nccl_available()):
        raise ConfigError(
            f"backend nccl needs one CUDA GPU per local process ({local_world_size}); this machine has "
            f"{gpus}{'' if dist.is_nccl_available() else ' and torch has no nccl'}: use --backend gloo"
        )
    if requested == "nccl" or (requested == "auto" and enough_gpus and dist.is_nccl_available()):
        return "nccl", torch.device("cuda", local_rank)
    return "gloo", torch.device("cpu")


@contextmanager
def distributed_session(backend: str = "auto") -> Iterator[DistContext]:
    """Join torchrun's process group for the duration of the block (a no-op outside torchrun).

    The group is destroyed when the block ends, also on an error, so the processes exit cleanly.

    Args:
        backend: `auto`, `gloo` or `nccl` (see `choose_backend`); ignored outside torchrun.

    Raises:
        ConfigError: a bad torchrun environment or an unusable backend.
    """
    env = torchrun_env()
    if env is None or env.world_size == 1:
        yield SINGLE_PROCESS
        return
    if dist.is_initialized():
        raise ConfigError("a torch.distributed process group is already initialised in this process")
    name, device = choose_backend(backend, env.local_rank, env.local_world_size)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend=name,
        timeout=COLLECTIVE_TIMEOUT,
        device_id=device if device.type == "cuda" else None,
    )
    context = DistContext(env.rank, env.local_rank, env.world_size, name, device)
    if context.is_main:
        log.info("distributed: %d processes, backend %s, device %s", env.world_size, name, device.type)
    try:
        yield context
    except BaseException:
        dist.destroy_process_group()  # no barrier: the other ranks may never reach one
        raise
    _leave_together()


def _leave_together() -> None:
    """Tear the group down on every rank at once, with nothing of it left for interpreter exit.

    Objects that still hold the group (a DDP reducer kept by a reference cycle) are collected while
    the group and the interpreter are fully alive, and the barrier keeps any rank from closing its
    connections while another still uses them: gloo aborts the process ("terminate called without an
    active exception") when its threads are torn down during interpreter finalization.
    """
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def is_main_process() -> bool:
    """True outside a process group and on rank 0 inside one."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier(context: DistContext) -> None:
    """Wait until every rank gets here."""
    if context.enabled:
        dist.barrier()


def all_reduce_sum(context: DistContext, values: Sequence[float]) -> list[float]:
    """Elementwise sums of `values` over every rank (float64), e.g. summed losses and row counts."""
    if not context.enabled:
        return [float(value) for value in values]
    tensor = torch.tensor(values, dtype=torch.float64, device=context.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu().tolist()


def broadcast_flag(context: DistContext, flag: bool) -> bool:
    """Rank 0's `flag`, on every rank (what the others pass is ignored)."""
    if not context.enabled:
        return flag
    tensor = torch.tensor([int(flag)], dtype=torch.int64, device=context.device)
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())
