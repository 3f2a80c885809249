"""The process group mlkv.distributed talks over, and the few collectives it uses, with errors made clear.

Every collective here is a torch.distributed call on the default group (or the group passed in): gloo on
CPU, NCCL on GPU. A peer that died makes gloo fail at once (connection reset); a peer that hangs makes the
call fail after the process group's timeout (`init(timeout=...)`, default 300 s). Either way the failure
is raised as `DistributedError` naming the operation, this rank and the world size, never a hang.

Thread-safety: collectives are issued by one thread per process (the training thread), in the same order on
every rank; that is the SPMD contract of torch.distributed and of every sharded table call.
"""

from __future__ import annotations

import os
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from ..errors import InvalidArgumentError, MlkvError

DEFAULT_TIMEOUT_S = 300.0
_timeout_s = DEFAULT_TIMEOUT_S  # of the group init() joined; also given to the gloo group cpu_group() makes


class DistributedError(MlkvError, RuntimeError):
    """A collective failed: a peer rank died, hung past the process group's timeout, or disagreed."""


def init(backend: str | None = None, timeout: float = DEFAULT_TIMEOUT_S) -> bool:
    """Join the default process group from torchrun's environment, unless one exists already.

    Args:
        backend: ``"gloo"`` or ``"nccl"``; None picks nccl when CUDA is available, else gloo.
        timeout: seconds a collective may wait for its peers before it fails with DistributedError.

    Returns:
        True if this call created the group (the caller then owns ``shutdown()``), False if it existed.

    Raises:
        DistributedError: the environment lacks torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR,
            MASTER_PORT) or the rendezvous failed.
    """
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
        raise InvalidArgumentError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    if dist.is_initialized():
        return False
    global _timeout_s
    _timeout_s = float(timeout)
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise DistributedError(
            f"no torch.distributed process group and no torchrun environment (missing {', '.join(missing)}); "
            "launch with `torchrun --nproc_per_node=N ...` or call torch.distributed.init_process_group first"
        )
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=float(timeout)))
    except (RuntimeError, ValueError) as e:
        raise DistributedError(f"joining the process group ({backend}) failed: {e}") from e
    return True


def shutdown() -> None:
    """Leave the default process group (no-op when there is none)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def rank_and_size(group=None) -> tuple[int, int]:
    """(this rank, world size); raises DistributedError when no process group exists."""
    if not dist.is_initialized():
        raise DistributedError(
            "torch.distributed is not initialised: call mlkv.distributed.init() (under torchrun) or "
            "torch.distributed.init_process_group() first"
        )
    return dist.get_rank(group), dist.get_world_size(group)


def cpu_group():
    """The group for row traffic (CPU tensors): None (the default group) when that is gloo, else a new gloo
    group over all ranks (collective: every rank must call it)."""
    if dist.get_backend() == "gloo":
        return None
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=_timeout_s))


def _failed(what: str, group, e: BaseException) -> DistributedError:
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    return DistributedError(
        f"{what} failed on rank {rank} of {size}: a peer rank died or did not answer within the process "
        f"group's timeout ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    )


def all_to_all(send: torch.Tensor, send_counts: list[int], recv_counts: list[int], what: str, group=None):
    """``all_to_all_single`` with uneven splits along dim 0: rank r gets send[offsets of r] from everyone."""
    recv = torch.empty((sum(recv_counts), *send.shape[1:]), dtype=send.dtype)
    try:
        dist.all_to_all_single(recv, send.contiguous(), recv_counts, send_counts, group=group)
    except RuntimeError as e:
        raise _failed(what, group, e) from e
    return recv


def exchange_counts(counts: np.ndarray, what: str, group=None) -> np.ndarray:
    """counts (world, k) int64, row d sent to rank d -> (world, k): row s is what rank s sent to this one."""
    send = torch.from_numpy(np.ascontiguousarray(counts, dtype=np.int64))
    recv = torch.empty_like(send)
    try:
        dist.all_to_all_single(recv, send, group=group)
    except RuntimeError as e:
        raise _failed(what, group, e) from e
    return recv.numpy()


def all_reduce(values, op: str, what: str, group=None) -> np.ndarray:
    """Element-wise reduction (``"sum"``, ``"min"``, ``"max"``) of an int64/float64 vector over all ranks."""
    t = torch.as_tensor(np.asarray(values)).clone()
    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
    try:
        dist.all_reduce(t, op=ops[op], group=group)
    except RuntimeError as e:
        raise _failed(what, group, e) from e
    return t.numpy()


def all_gather_ints(values, what: str, group=None) -> np.ndarray:
    """(world, len(values)) int64: row r is rank r's `values`."""
    t = torch.as_tensor(np.asarray(values, dtype=np.int64))
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    try:
        dist.all_gather(out, t, group=group)
    except RuntimeError as e:
        raise _failed(what, group, e) from e
    return torch.stack(out).numpy()


def all_reduce_gradients(params, world_size: int, group=None) -> None:
    """Sum the ``.grad`` of `params` over all ranks, in one flat buffer (parameters without grad count as 0).

    The training loop scales each rank's loss by its share of the global batch, so the sum is the gradient of
    the global batch's mean loss: exactly what one process computes on the whole batch."""
    params = [p for p in params if p.requires_grad]
    if world_size == 1 or not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    try:
        dist.all_reduce(flat, group=group)
    except RuntimeError as e:
        raise _failed("all_reduce of dense gradients", group, e) from e
    at = 0
    for p in params:
        n = p.numel()
        p.grad = flat[at : at + n].view_as(p).clone()
        at += n


__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DistributedError",
    "all_gather_ints",
    "all_reduce",
    "all_reduce_gradients",
    "all_to_all",
    "cpu_group",
    "exchange_counts",
    "init",
    "rank_and_size",
    "shutdown",
]
