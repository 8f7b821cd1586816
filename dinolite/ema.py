"""The teacher is an exponential moving average (EMA) of the student.

    teacher <- m * teacher + (1 - m) * student        (every parameter, after each optimiser step)

Only parameters are averaged, as in DINOv2. Buffers are not copied: the ViT and the heads have no
running statistics (no BatchNorm), and their buffers (e.g. RoPE periods) are constants that the
teacher copy already holds. If you add a module with running statistics, sync its buffers yourself.
"""
import copy

import torch
import torch.nn as nn


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
        if t is s or (t.numel() > 0 and t.data_ptr() == s.data_ptr()):
            raise ValueError(f"parameter {name!r} is shared between teacher and student; use make_teacher(student)")
    return [teacher_params[n] for n in names], [student_params[n] for n in names]


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """In place: teacher = momentum * teacher + (1 - momentum) * student, parameters matched by name."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    teacher_params, student_params = _matched_parameters(teacher, student)
    if not teacher_params:
        return
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)
