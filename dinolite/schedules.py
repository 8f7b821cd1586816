"""Hyper-parameter schedules of the DINOv2 recipe, as pure functions of the iteration number.

All functions take `step` (0-based iteration) and return a float. They reproduce the values of
the official schedules (arrays built once, indexed by the iteration):

* warm-up: `warmup_steps` values linearly spaced from `warmup_start` to `start`, both ends
  included (the last warm-up step already has the value `start`);
* cosine: at step warmup_steps + j, with n = total_steps - warmup_steps cosine steps,
      end + 0.5 * (start - end) * (1 + cos(pi * j / n))
  (so the last scheduled step is one step short of `end`);
* from `total_steps` on: `end`.

DINOv2 recipe (epoch = 1250 iterations; see `dinov2_schedules`):
    learning rate   0 -> base_lr * sqrt(batch / 1024) over 10 epochs, then cosine to 1e-6
    weight decay    cosine 0.04 -> 0.4
    teacher momentum cosine 0.992 -> 1.0
    teacher temperature linear 0.04 -> 0.07 over 30 epochs, then constant
    last layer      learning rate 0 during the first epoch, then the learning rate above
"""
import math
import operator


def _check_step(step) -> int:
    try:
        step = operator.index(step)
    except TypeError:
        raise TypeError(f"step must be an integer iteration number, got {step!r}") from None
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return step


def _check_lengths(total_steps: int, warmup_steps: int) -> None:
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must not exceed total_steps ({total_steps}); "
                         "shorten the warm-up or train longer")


def _linear_warmup(step: int, warmup_steps: int, warmup_start: float, start: float) -> float:
    if warmup_steps == 1:
        return warmup_start
    return warmup_start + (start - warmup_start) * step / (warmup_steps - 1)


def cosine_schedule(step: int, total_steps: int, start: float, end: float,
                    warmup_steps: int = 0, warmup_start: float = 0.0) -> float:
    """Linear warm-up from `warmup_start` to `start` over `warmup_steps`, then cosine from `start` to `end`."""
    step = _check_step(step)
    _check_lengths(total_steps, warmup_steps)
    if step >= total_steps:
        return end
    if step < warmup_steps:
        return _linear_warmup(step, warmup_steps, warmup_start, start)
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def linear_warmup_constant(step: int, warmup_steps: int, start: float, end: float) -> float:
    """Linear from `start` to `end` over `warmup_steps` (both ends included), then `end` forever."""
    step = _check_step(step)
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if step >= warmup_steps:
        return end
    return _linear_warmup(step, warmup_steps, start, end)


def gram_weight(step: int, total_steps: int, weight: float, start_step: int = 0, warmup_steps: int = 0,
                final_weight: float | None = None) -> float:
    """DINOv3's Gram loss weight: 0 before `start_step`, then a linear ramp from 0 to `weight` over
    `warmup_steps`, then `weight` (final_weight None) or a cosine from `weight` to `final_weight` at
    `total_steps`. (7B refinement: 0 until 1M iterations, a ramp to 2.0, then constant.)"""
    step = _check_step(step)
    if step < start_step:
        return 0.0
    if final_weight is None:
        return linear_warmup_constant(step - start_step, warmup_steps, 0.0, weight)
    return cosine_schedule(step - start_step, total_steps - start_step, weight, final_weight, warmup_steps, 0.0)


def teacher_temperature(step: int, warmup_steps: int, start: float = 0.04, end: float = 0.07) -> float:
    """Teacher softmax temperature: 0.04 -> 0.07 linearly (DINOv2: over 30 x 1250 steps), then 0.07."""
    return linear_warmup_constant(step, warmup_steps, start, end)


def learning_rate(step: int, total_steps: int, peak_lr: float, warmup_steps: int,
                  min_lr: float = 1e-6, warmup_start: float = 0.0) -> float:
    """Linear warm-up 0 -> peak_lr, then cosine down to min_lr (DINOv2 min_lr 1e-6)."""
    return cosine_schedule(step, total_steps, peak_lr, min_lr, warmup_steps, warmup_start)


def last_layer_learning_rate(step: int, total_steps: int, peak_lr: float, warmup_steps: int,
                             freeze_steps: int, min_lr: float = 1e-6, warmup_start: float = 0.0) -> float:
    """The learning rate of the head's prototype layer: 0 while frozen (DINOv2: first epoch), else as `learning_rate`."""
    step = _check_step(step)
    if freeze_steps < 0:
        raise ValueError(f"freeze_steps must be >= 0, got {freeze_steps}")
    if step < freeze_steps:
        return 0.0
    return learning_rate(step, total_steps, peak_lr, warmup_steps, min_lr, warmup_start)


def weight_decay(step: int, total_steps: int, start: float = 0.04, end: float = 0.4) -> float:
    """Cosine weight decay schedule 0.04 -> 0.4 (0.2 for ViT-L/g)."""
    return cosine_schedule(step, total_steps, start, end)


def teacher_momentum(step: int, total_steps: int, start: float = 0.992, end: float = 1.0) -> float:
    """EMA momentum of the teacher, cosine 0.992 -> 1.0 (start 0.994 for ViT-L/g)."""
    return cosine_schedule(step, total_steps, start, end)


def scaled_learning_rate(base_lr: float, global_batch_size: int, reference_batch_size: int = 1024) -> float:
    """DINOv2's square-root scaling rule: base_lr * sqrt(global_batch / 1024)."""
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
    return base_lr * math.sqrt(global_batch_size / reference_batch_size)


def dinov2_schedules(step: int, epochs: int = 100, epoch_length: int = 1250, base_lr: float = 0.004,
                     global_batch_size: int = 1024, warmup_epochs: int = 10, min_lr: float = 1e-6,
                     weight_decay_start: float = 0.04, weight_decay_end: float = 0.4,
                     momentum_start: float = 0.992, teacher_temp_start: float = 0.04,
                     teacher_temp_end: float = 0.07, teacher_temp_warmup_epochs: int = 30,
                     freeze_last_layer_epochs: int = 1) -> dict:
    """Every scheduled value of the DINOv2 recipe at `step`, as a dict (defaults: ViT-S/B recipe)."""
    total = epochs * epoch_length
    peak = scaled_learning_rate(base_lr, global_batch_size)
    warmup = warmup_epochs * epoch_length
    return dict(
        lr=learning_rate(step, total, peak, warmup, min_lr),
        last_layer_lr=last_layer_learning_rate(step, total, peak, warmup, freeze_last_layer_epochs * epoch_length, min_lr),
        weight_decay=weight_decay(step, total, weight_decay_start, weight_decay_end),
        teacher_momentum=teacher_momentum(step, total, momentum_start),
        teacher_temp=teacher_temperature(step, teacher_temp_warmup_epochs * epoch_length,
                                         teacher_temp_start, teacher_temp_end),
    )
