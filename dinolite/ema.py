"""The teacher is an exponential moving average (EMA) of the student.

    teacher <- m * teacher + (1 - m) * student        (every parameter, after each optimiser step)

Only parameters are averaged, as in DINOv2. Parameters sharded by FSDP2 (DTensors) are averaged shard by
shard: each process updates its local shards, with no communication, as long as teacher and student are
sharded alike (scale/ shards both with the same plan). Buffers are not copied: the ViT and the heads have no
running statistics (no BatchNorm), and their buffers (e.g. RoPE periods) are constants that the
teacher copy already holds. If you add a module with running statistics, sync its buffers yourself.
"""
import copy

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor


def make_teacher(student: nn.Module) -> nn.Module:
    """A new teacher: a deep copy of `student` (never the same object), frozen and in eval mode.

    eval() turns off stochastic depth / dropout in the teacher, which DINOv2 builds without drop path.
    """
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    teacher.eval()
    return teacher


def _matched_parameters(teacher: nn.Module, student: nn.Module):
    if teacher is student:
        raise ValueError("the teacher is the same object as the student, so the EMA does nothing; "
                         "create the teacher with dinolite.ema.make_teacher(student)")
    teacher_params = dict(teacher.named_parameters())
    student_params = dict(student.named_parameters())
    if teacher_params.keys() != student_params.keys():
        missing = sorted(student_params.keys() - teacher_params.keys())[:5]
        extra = sorted(teacher_params.keys() - student_params.keys())[:5]
        raise ValueError(f"teacher and student parameters differ: only in student {missing}, only in teacher {extra}; "
                         "build the teacher as a copy of the student (make_teacher)")
    names = list(student_params)
    for name in names:
        t, s = teacher_params[name], student_params[name]
        if t.shape != s.shape:
            raise ValueError(f"parameter {name!r} has shape {tuple(t.shape)} in the teacher "
                             f"but {tuple(s.shape)} in the student")
        t_local = t.to_local() if isinstance(t, DTensor) else t
        s_local = s.to_local() if isinstance(s, DTensor) else s
        if t is s or (t_local.numel() > 0 and t_local.data_ptr() == s_local.data_ptr()):
            raise ValueError(f"parameter {name!r} is shared between teacher and student; use make_teacher(student)")
    return [teacher_params[n] for n in names], [student_params[n] for n in names]


def _local_shards(teacher_params, student_params, names=None):
    """Plain tensors to update in place: a DTensor's local shard (placements must match), else the tensor."""
    teacher_out, student_out = [], []
    for t, s in zip(teacher_params, student_params):
        if isinstance(t, DTensor) or isinstance(s, DTensor):
            if not (isinstance(t, DTensor) and isinstance(s, DTensor)) or t.placements != s.placements \
                    or t.device_mesh != s.device_mesh:
                raise ValueError("teacher and student parameters are sharded differently; shard the teacher with "
                                 "the same plan and mesh as the student")
            t, s = t.to_local(), s.to_local()
        teacher_out.append(t)
        student_out.append(s)
    return teacher_out, student_out


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """In place: teacher = momentum * teacher + (1 - momentum) * student, parameters matched by name."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    teacher_params, student_params = _matched_parameters(teacher, student)
    if not teacher_params:
        return
    teacher_params, student_params = _local_shards(teacher_params, student_params)
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)
