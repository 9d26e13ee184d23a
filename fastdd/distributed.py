"""Process-group plumbing for ``torchrun`` runs (``torch.distributed``; no hand-written communication).

``torchrun --nproc_per_node N -m fastdd distill ...`` (or ``python -m torch.distributed.run``) starts N
processes with ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT``) in their
environment. :func:`from_env` reads them (``None`` for an ordinary single process, or ``WORLD_SIZE=1``);
:func:`init` joins the process group: ``gloo`` on the CPU, ``nccl`` on CUDA with the device
``cuda:LOCAL_RANK`` (the barriers then go through a ``gloo`` group, so that waiting ranks do not hold a
GPU collective). The only communication of a sharded run is :func:`barrier`; the shards travel as files
in the run's directory, which must therefore be shared by all processes (one machine, or a shared
filesystem).

A rank that finishes early waits at the final barrier for the slowest one, so the group's timeout is long:
``FASTDD_DIST_TIMEOUT`` seconds (default 7 days). When a process dies, torchrun stops the others.

Test hook: ``FASTDD_KILL_AT=RANK:STEP`` makes rank RANK send itself ``SIGKILL`` once its STEP-th step
(counted within its own shard, from 1) has been computed, before that step is counted or checkpointed
(:func:`install_kill_hook`). Nothing else reads it; it exists so that tests can kill a rank
deterministically.
"""
from __future__ import annotations

import datetime
import os
import signal
from dataclasses import dataclass
from typing import Optional

import torch

KILL_ENV = "FASTDD_KILL_AT"
TIMEOUT_ENV = "FASTDD_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 7 * 24 * 3600


@dataclass(frozen=True)
class DistContext:
    """This process's place in a torchrun job."""

    world: int
    rank: int
    local_rank: int

    def device(self, requested: torch.device) -> torch.device:
        """The device of this rank: ``cuda:LOCAL_RANK`` when ``requested`` is a CUDA device, else ``requested``."""
        requested = torch.device(requested)
        if requested.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return requested


def _env_int(name: str, env) -> Optional[int]:
    value = env.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r}: not an integer (is this a torchrun environment?)") from None


def from_env(env=None) -> Optional[DistContext]:
    """The torchrun context from ``env`` (default ``os.environ``), or ``None`` when ``WORLD_SIZE`` is unset or 1."""
    env = os.environ if env is None else env
    world = _env_int("WORLD_SIZE", env)
    if world is None or world == 1:
        return None
    rank, local = _env_int("RANK", env), _env_int("LOCAL_RANK", env)
    if world < 1 or rank is None or not 0 <= rank < world:
        raise ValueError(f"torchrun environment: WORLD_SIZE={world}, RANK={rank}: need 0 <= RANK < WORLD_SIZE")
    return DistContext(world=world, rank=rank, local_rank=rank if local is None else local)


_BARRIER_GROUP = None


def init(ctx: DistContext, device: torch.device) -> None:
    """Join the default process group (``gloo`` on the CPU, ``nccl`` on CUDA, after selecting
    ``cuda:LOCAL_RANK``); a no-op when it is already initialised."""
    import torch.distributed as dist

    global _BARRIER_GROUP
    if dist.is_initialized():
        return
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    device = torch.device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=timeout, world_size=ctx.world, rank=ctx.rank)
    _BARRIER_GROUP = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None


def barrier() -> None:
    """Wait until every rank gets here (no-op outside a process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=_BARRIER_GROUP)


def shutdown() -> None:
    """Leave the process group (no-op when none)."""
    import torch.distributed as dist

    global _BARRIER_GROUP
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _BARRIER_GROUP = None


def kill_step(rank: int, env=None) -> Optional[int]:
    """The step after which rank ``rank`` must kill itself (``FASTDD_KILL_AT=RANK:STEP``), or None."""
    env = os.environ if env is None else env
    spec = env.get(KILL_ENV, "")
    if not spec:
        return None
    try:
        r, k = (int(v) for v in spec.split(":"))
    except ValueError:
        raise ValueError(f"{KILL_ENV}={spec!r}: expected RANK:STEP") from None
    return k if r == rank else None


def install_kill_hook(method, rank: int) -> None:
    """Wrap ``method.step`` so that this process SIGKILLs itself after its ``FASTDD_KILL_AT`` step (module
    docstring); does nothing when the variable does not name ``rank``."""
    k = kill_step(rank)
    if k is None:
        return
    inner = method.step

    def step() -> float:
        loss = inner()
        if method.iteration + 1 >= k:
            os.kill(os.getpid(), signal.SIGKILL)
        return loss

    method.step = step
