"""Data-parallel training through torch.distributed, started by ``torchrun``; one process is the plain case.

Every helper here is the identity when no process group is initialised, so single-process code
calls them unconditionally. Under ``torchrun`` the group is created from its environment variables
(NCCL on GPUs, gloo on CPUs); ``train.batch_size`` stays the *global* batch, each rank taking a
contiguous slice of it, so a recipe means the same thing on one GPU or eight.
"""

from __future__ import annotations

import inspect
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from kt_edge.errors import KtEdgeError


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0 alone writes checkpoints, metrics and sidecars."""
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def init_from_env(device: str = "auto", timeout_s: float = 1800) -> bool:
    """Join the process group ``torchrun`` describes (WORLD_SIZE > 1); True when this run is distributed.

    GPU runs pin each process to GPU ``LOCAL_RANK`` before anything else touches CUDA.
    """
    if dist.is_available() and dist.is_initialized():
        return active()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return False
    if not dist.is_available():
        raise KtEdgeError(f"WORLD_SIZE={world} but this torch build has no torch.distributed")
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return True


def local_batch_size(global_batch: int, key: str) -> int:
    """This rank's share of the global batch; refuses a batch the ranks cannot split evenly."""
    world = world_size()
    if global_batch % world:
        raise KtEdgeError(
            f"{key} {global_batch} does not split evenly over {world} processes; use a multiple of {world}"
        )
    return global_batch // world


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's tensor, concatenated in rank order (no gradient), as the official MoCo/SEED code."""
    if not active():
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered)


@torch.no_grad()
def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks (no gradient); one process: the tensor itself."""
    if active():
        dist.all_reduce(tensor)
    return tensor


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor):
        ctx.rows = len(tensor)
        return concat_all_gather(tensor)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's gradient for every row; this rank keeps its own rows'
        return grad[rank() * ctx.rows : (rank() + 1) * ctx.rows]


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor):
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def all_gather_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's tensor, concatenated in rank order, with gradients flowing back to each rank's own slice
    (SimCLR's global negatives); every rank must pass the same number of rows. One process: the tensor."""
    return _AllGather.apply(tensor) if active() else tensor


def all_reduce_grad(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks, differentiable: the backward sums every rank's gradient (Barlow Twins' correlation).

    With DDP's gradient averaging this gives exactly the gradient of the loss on the global batch.
    One process: the tensor itself.
    """
    return _AllReduce.apply(tensor) if active() else tensor


@torch.no_grad()
def shuffle_batch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Shuffled BN (MoCo): this rank's slice of a random permutation of the global batch, and the inverse.

    The permutation comes from rank 0's generator and is broadcast, so the key encoder's BN
    statistics on each rank mix images of every rank. One process: the batch unchanged.
    """
    if not active():
        return x, None
    gathered = concat_all_gather(x)
    order = torch.randperm(len(gathered)) if is_main() else torch.empty(len(gathered), dtype=torch.long)
    order = order.to(x.device)
    dist.broadcast(order, src=0)  # rank 0's draw: the other ranks' generators stay untouched
    return gathered[order.view(dist.get_world_size(), -1)[dist.get_rank()]], torch.argsort(order)


@torch.no_grad()
def unshuffle_batch(x: torch.Tensor, inverse: torch.Tensor | None) -> torch.Tensor:
    """Undo ``shuffle_batch`` on the encoder's outputs: each rank gets back the rows of its own images."""
    if inverse is None:
        return x
    gathered = concat_all_gather(x)
    return gathered[inverse.view(dist.get_world_size(), -1)[dist.get_rank()]]


def agree(scalars: dict[str, torch.Tensor], flags: dict[str, bool]) -> tuple[dict[str, float], dict[str, bool]]:
    """Logged scalars averaged over ranks, and flags true on every rank when true on one (a stop signal, a due
    resume point), in one all-reduce and one host synchronisation; so every rank takes the same decisions at the
    same step. One process: the values as floats, the flags as they are."""
    names = list(scalars)
    packed = torch.stack([scalars[k].detach().float().reshape(()) for k in names])
    if active():
        device = packed.device
        packed = torch.cat([packed, torch.tensor([float(flags[k]) for k in flags], device=device)])
        dist.all_reduce(packed)
        packed /= dist.get_world_size()
        values = packed.tolist()
        return dict(zip(names, values)), {k: v > 0 for k, v in zip(flags, values[len(names) :])}
    return dict(zip(names, packed.tolist())), dict(flags)


class _TrainingStep(nn.Module):
    """Routes ``training_step`` through ``forward`` so DistributedDataParallel sees every step."""

    def __init__(self, method: nn.Module):
        super().__init__()
        self.method = method

    def forward(self, batch):
        return self.method.training_step(batch)


def step_function(method: nn.Module, device: torch.device):
    """``method.training_step``, wrapped in DistributedDataParallel when several processes train.

    Buffers are not re-broadcast each step: queues stay equal on every rank because each rank
    enqueues the same gathered batch, and rank 0's BN statistics are the ones saved.
    """
    if not active():
        return method.training_step
    ddp = nn.parallel.DistributedDataParallel
    no_buffer_sync = (
        {"forward_sync_buffers": False}  # the newer name; broadcast_buffers is deprecated
        if "forward_sync_buffers" in inspect.signature(ddp).parameters
        else {"broadcast_buffers": False}
    )
    return ddp(_TrainingStep(method), device_ids=[device.index] if device.type == "cuda" else None, **no_buffer_sync)
