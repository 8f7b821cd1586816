"""Thin helpers over torch.distributed that are no-ops in a single process.

Every statistic that DINO-family losses compute over "the batch" (Sinkhorn-Knopp sums,
the EMA centre, KoLeo neighbours, the number of masked patches) must be computed over the
*global* batch when training on several processes. These helpers let the same code run
with and without an initialised process group.

Every collective in dinolite and scale/ goes through `all_reduce_`, `all_reduce_sum_`, `all_reduce_max_`,
`all_gather_cat` or `broadcast_`, which check that each tensor lies on the training device
(`set_collective_device`, called by whoever builds the process group). NCCL has no CPU backend: a CPU tensor
in a CUDA run fails with an obscure error deep in NCCL (or hangs); here it fails at once, naming the tensor's
device. The CPU tests set the expected device to 'meta' to catch a tensor made without device=.
"""
import torch
import torch.distributed as dist

_collective_device = None  # torch.device every collective's tensors must be on; None = not checked


def set_collective_device(device) -> None:
    """Check every later collective's tensors against `device` (the training device); None switches it off."""
    global _collective_device
    _collective_device = None if device is None else torch.device(device)


def collective_device():
    """The device collectives are checked against (None: unchecked)."""
    return _collective_device


def check_device(tensor: torch.Tensor, what: str = "collective") -> torch.Tensor:
    """Raise a one-line error when `tensor` is not on the collective device (device types and, when the
    expected device names one, its index)."""
    expected = _collective_device
    if expected is not None:
        got = tensor.device
        if got.type != expected.type or (expected.index is not None and got.index is not None
                                          and got.index != expected.index):
            raise RuntimeError(f"{what}: tensor on {got} but collectives run on {expected}; create it with "
                               f"device= the training device (NCCL cannot reduce CPU tensors)")
    return tensor


def is_enabled() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size(group=None) -> int:
    return dist.get_world_size(group) if is_enabled() else 1


def get_rank(group=None) -> int:
    return dist.get_rank(group) if is_enabled() else 0


def all_reduce_(tensor: torch.Tensor, op=None, group=None, async_op: bool = False):
    """dist.all_reduce (default SUM) on a device-checked tensor; a no-op (None) without a process group.
    Returns the work handle when async_op."""
    if not is_enabled():
        return None
    check_device(tensor, "all_reduce")
    return dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op is None else op, group=group, async_op=async_op)


def broadcast_(tensor: torch.Tensor, src: int = 0, group=None) -> torch.Tensor:
    """dist.broadcast from `src`, in place, on a device-checked tensor. Returns it for chaining."""
    if is_enabled():
        dist.broadcast(check_device(tensor, "broadcast"), src=src, group=group)
    return tensor


def all_reduce_sum_(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum `tensor` over all processes, in place. Returns it for chaining."""
    all_reduce_(tensor, dist.ReduceOp.SUM, group)
    return tensor


def all_reduce_max_(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Element-wise maximum of `tensor` over all processes, in place. Returns it for chaining."""
    all_reduce_(tensor, dist.ReduceOp.MAX, group)
    return tensor


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        world = dist.get_world_size(group)
        check_device(tensor, "all_gather")
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
