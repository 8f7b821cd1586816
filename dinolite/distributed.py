"""Thin helpers over torch.distributed that are no-ops in a single process.

Every statistic that DINO-family losses compute over "the batch" (Sinkhorn-Knopp sums,
the EMA centre, KoLeo neighbours, the number of masked patches) must be computed over the
*global* batch when training on several processes. These helpers let the same code run
with and without an initialised process group.
"""
import torch
import torch.distributed as dist


def is_enabled() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size(group=None) -> int:
    return dist.get_world_size(group) if is_enabled() else 1


def get_rank(group=None) -> int:
    return dist.get_rank(group) if is_enabled() else 0


def all_reduce_sum_(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum `tensor` over all processes, in place. Returns it for chaining."""
    if is_enabled():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def all_reduce_max_(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Element-wise maximum of `tensor` over all processes, in place. Returns it for chaining."""
    if is_enabled():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return tensor


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        world = dist.get_world_size(group)
        out = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(out, tensor.contiguous(), group=group)
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        # Each rank's slice receives the sum of the gradients every rank computed for it.
        stacked = torch.stack(grads)
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=ctx.group)
        return stacked[dist.get_rank(ctx.group)], None


def all_gather_cat(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate `tensor` [B, ...] from all ranks along dim 0 -> [world * B, ...].

    Differentiable: the backward pass routes gradients back to the rank that owns each row.
    All ranks must pass the same shape. Single process: returns `tensor` unchanged.
    """
    if not is_enabled() or get_world_size(group) == 1:
        return tensor
    return torch.cat(_GatherWithGrad.apply(tensor, group), dim=0)
