"""Data-parallel helpers of the trainer: this process's place in the group, averaging, FSDP shards.

Every function works without torch.distributed (one process: rank 0 of 1, tensors as they are).
The collectives among them must be called by every process in the same order.
"""
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor


def world() -> tuple[int, int]:
    """(rank, world_size) of the running torch.distributed group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def average_gradients(params: list[torch.Tensor], world_size: int):
    """Replace each parameter's gradient by its mean over the processes (one all-reduce of all of them;
    a missing gradient counts as zeros), as DDP does. A collective."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    for p, chunk in zip(params, flat.split([p.numel() for p in params])):
        p.grad = chunk.view_as(p)


def mean_over_processes(value: torch.Tensor, world_size: int) -> float:
    """The mean of a scalar over the processes, in float32 (a collective; the value itself with one)."""
    value = value.detach().float().reshape(1)
    if world_size > 1:
        dist.all_reduce(value)
        value /= world_size
    return float(value)


def gathered(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP shard (a collective: every process calls it); plain tensors as they are."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def copy_whole(param: torch.Tensor, whole: torch.Tensor):
    """Copy a whole tensor into a parameter, taking this process's shard of an FSDP parameter."""
    if isinstance(param, DTensor):
        whole = distribute_tensor(whole.to(param.device, param.dtype), param.device_mesh, param.placements)
    param.copy_(whole)


def shard_like(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """A whole optimizer state tensor shaped like an FSDP parameter -> this process's shard of it
    (anything else as it is)."""
    if isinstance(param, DTensor) and value.shape == param.shape:
        return distribute_tensor(value, param.device_mesh, param.placements)
    return value
