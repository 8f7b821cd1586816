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
                    (DINOv3 scales by 4 * sqrt(batch / 1024): scaled_learning_rate's rules, warmup_cosine_constant)
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


def cosine_ramp(step: int, ramp_steps: int, start: float, end: float) -> float:
    """The cosine piece of DINOv3's schedules: start -> end over ramp_steps with both ends included
    (step 0: start, step ramp_steps - 1: end; numpy cos(linspace(0, pi, n))), then `end`."""
    step = _check_step(step)
    if step >= ramp_steps:
        return end
    c = 1.0 if ramp_steps == 1 else (1.0 + math.cos(math.pi * step / (ramp_steps - 1))) / 2
    return (start - end) * c + end


def gram_weight(step: int, total_steps: int, weight: float, start_step: int = 0, warmup_steps: int = 0,
                final_weight: float | None = None) -> float:
    """DINOv3's Gram loss weight: 0 before `start_step`, then a cosine ramp from 0 to `weight` over
    `warmup_steps` (cosine_ramp), then `weight` (final_weight None) or a cosine from `weight` to `final_weight`
    at `total_steps`. 7B (dinov3_vit7b16_gram_anchor.yaml:64-69, loss_weight_schedule start 0, peak 0, end 2.0,
    warmup_epochs 1000, cosine_epochs 1): 0 until iteration 1M, a cosine ramp to 2.0 over 1000, then constant."""
    step = _check_step(step)
    if step < start_step:
        return 0.0
    if step - start_step < warmup_steps or final_weight is None:
        return cosine_ramp(step - start_step, warmup_steps, 0.0, weight)
    return cosine_schedule(step - start_step - warmup_steps, max(total_steps - start_step - warmup_steps, 1),
                           weight, final_weight)


def local_dino_weight(step: int, weight: float, start_step: int = 0, ramp_steps: int = 0) -> float:
    """DINOv3's weight of the DINO local-crop pairs in the Gram stage: 1 before `start_step`, then a cosine ramp
    from 1 to `weight` over ramp_steps, then `weight` (dinov3_vit7b16_gram_anchor.yaml:25-31,
    local_loss_weight_schedule start 1, peak 1, end 0.5, warmup_epochs 1000, cosine_epochs 1)."""
    step = _check_step(step)
    if step < start_step:
        return 1.0
    return cosine_ramp(step - start_step, ramp_steps, 1.0, weight)


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


SCALING_RULES = ("sqrt_1024", "sqrt_1024_x4", "linear_256", "none")


def scaled_learning_rate(base_lr: float, global_batch_size: int, rule: str = "sqrt_1024") -> float:
    """The peak learning rate of `base_lr` at a global batch, by a scaling rule:
      sqrt_1024     base_lr * sqrt(batch / 1024)      DINOv2 (dinov2/utils/config.py:25, "sqrt_wrt_1024")
      sqrt_1024_x4  base_lr * 4 * sqrt(batch / 1024)  DINOv3 (dinov3/train/train.py:170-171 and
                    dinov3/configs/config.py:52: the same name "sqrt_wrt_1024", a factor 4 more)
      linear_256    base_lr * batch / 256             (dinov3/train/train.py:164, "linear_wrt_256")
      none          base_lr
    """
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
    sqrt = math.sqrt(global_batch_size / 1024)
    factors = {"sqrt_1024": sqrt, "sqrt_1024_x4": 4 * sqrt, "linear_256": global_batch_size / 256, "none": 1.0}
    if rule not in factors:
        raise ValueError(f"unknown lr scaling rule {rule!r}: use one of {', '.join(SCALING_RULES)}")
    return base_lr * factors[rule]


def warmup_cosine_constant(step: int, total_steps: int, start: float, peak: float, end: float, warmup_steps: int,
                           cosine_steps: int | None = None) -> float:
    """DINOv3's schedule shape (dinov3/train/cosine_lr_scheduler.py, linear_warmup_cosine_decay) at `step`:
    linear start -> peak over warmup_steps with the peak itself not reached (numpy linspace, endpoint=False),
    then a cosine from peak to end over cosine_steps (default: the rest of the run) with BOTH ends included,
    then `end` (also after total_steps).

    7B pre-training lr: start 0, peak = end (constant after the warm-up). High-resolution stage: start = peak = 0,
    end 1.25e-5, no warm-up, cosine_steps 10 epochs: a cosine rise from 0 to the end value, then flat."""
    step = _check_step(step)
    cosine_steps = total_steps - warmup_steps if cosine_steps is None else cosine_steps
    if warmup_steps < 0 or cosine_steps < 0 or warmup_steps + cosine_steps > total_steps:
        raise ValueError(f"warm-up ({warmup_steps}) and cosine ({cosine_steps}) steps must be >= 0 and fit in "
                         f"total_steps ({total_steps}); shorten them or train longer")
    if step < warmup_steps:
        return start + (peak - start) * step / warmup_steps
    return cosine_ramp(step - warmup_steps, cosine_steps, peak, end)


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
