import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from dinolite import schedules
from dinolite.ema import ema_update_, make_teacher


# ---------------------------------------------------------------- schedules

def array_schedule(total, start, end, warmup=0, warmup_start=0.0):
    """The schedule as an array, built the obvious way: linspace warm-up, then cosine over the rest."""
    warm = np.linspace(warmup_start, start, warmup)
    j = np.arange(total - warmup)
    cos = end + 0.5 * (start - end) * (1 + np.cos(np.pi * j / len(j))) if len(j) else np.array([])
    return np.concatenate([warm, cos])


def test_cosine_hand_values():
    f = lambda s: schedules.cosine_schedule(s, total_steps=10, start=1.0, end=0.0)
    assert f(0) == 1.0
    assert abs(f(2) - 0.5 * (1 + math.cos(0.2 * math.pi))) < 1e-12 and abs(f(2) - 0.9045085) < 1e-7
    assert abs(f(5) - 0.5) < 1e-12
    assert f(10) == 0.0 and f(10_000) == 0.0  # after the end: the final value


def test_cosine_with_warmup_hand_values():
    f = lambda s: schedules.cosine_schedule(s, 10, start=1.0, end=0.0, warmup_steps=4, warmup_start=0.0)
    assert [round(f(s), 6) for s in range(4)] == [0.0, 0.333333, 0.666667, 1.0]  # linspace incl. both ends
    assert f(4) == 1.0
    assert abs(f(7) - 0.5) < 1e-12  # j = 3 of 6 cosine steps
    assert abs(f(9) - 0.5 * (1 - math.sqrt(3) / 2)) < 1e-12  # j = 5: cos(5 pi / 6)


@pytest.mark.parametrize("warmup", [0, 1, 7, 20])
def test_cosine_equals_array_reference(warmup):
    expected = array_schedule(20, 0.004, 1e-6, warmup, 1e-5)
    got = [schedules.cosine_schedule(s, 20, 0.004, 1e-6, warmup, 1e-5) for s in range(20)]
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0)


def test_teacher_temperature():
    f = lambda s: schedules.teacher_temperature(s, warmup_steps=31)
    assert f(0) == 0.04
    assert abs(f(15) - 0.055) < 1e-12  # halfway through 31 linspace points
    assert abs(f(30) - 0.07) < 1e-12 and f(31) == 0.07 and f(10 ** 6) == 0.07
    assert schedules.linear_warmup_constant(3, 0, 0.04, 0.07) == 0.07


def test_dinov2_recipe_values():
    epoch = 1250
    total = 100 * epoch
    v = schedules.dinov2_schedules(0)
    assert v == pytest.approx(dict(lr=0.0, last_layer_lr=0.0, weight_decay=0.04, teacher_momentum=0.992,
                                   teacher_temp=0.04), abs=1e-15)
    half = schedules.dinov2_schedules(total // 2)
    assert abs(half["weight_decay"] - 0.22) < 1e-12  # 0.4 + 0.5 * (0.04 - 0.4)
    assert abs(half["teacher_momentum"] - 0.996) < 1e-12
    assert half["teacher_temp"] == 0.07
    # Warm-up reaches the peak lr at its last step (10 epochs); lr = 0.004 * sqrt(2048 / 1024) for batch 2048.
    peak = schedules.dinov2_schedules(10 * epoch - 1, global_batch_size=2048)["lr"]
    assert abs(peak - 0.004 * math.sqrt(2)) < 1e-15
    # The last layer is frozen during the first epoch only.
    assert schedules.dinov2_schedules(epoch - 1)["last_layer_lr"] == 0.0
    after = schedules.dinov2_schedules(epoch)
    assert after["last_layer_lr"] == after["lr"] and abs(after["lr"] - 0.004 * epoch / (10 * epoch - 1)) < 1e-15
    assert schedules.dinov2_schedules(total)["lr"] == 1e-6


def test_schedule_errors():
    with pytest.raises(ValueError, match="step must be >= 0"):
        schedules.cosine_schedule(-1, 10, 1.0, 0.0)
    with pytest.raises(ValueError, match="must not exceed total_steps"):
        schedules.cosine_schedule(0, 10, 1.0, 0.0, warmup_steps=11)
    with pytest.raises(ValueError, match="total_steps"):
        schedules.cosine_schedule(0, 0, 1.0, 0.0)
    with pytest.raises(TypeError, match="integer"):
        schedules.cosine_schedule(1.5, 10, 1.0, 0.0)
    with pytest.raises(ValueError, match="step must be >= 0"):
        schedules.teacher_temperature(-3, 10)
    with pytest.raises(ValueError, match="global_batch_size"):
        schedules.scaled_learning_rate(0.004, 0)


# ---------------------------------------------------------------- EMA

def small_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 3), nn.LayerNorm(3))


def test_make_teacher_is_a_frozen_copy():
    student = small_net()
    teacher = make_teacher(student)
    assert teacher is not student and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    for (n, p), (_, q) in zip(student.named_parameters(), teacher.named_parameters()):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr(), n
    with torch.no_grad():
        student[0].weight.add_(1.0)
    assert not torch.equal(student[0].weight, teacher[0].weight)


def test_momentum_one_keeps_teacher_and_zero_copies_student():
    student, teacher = small_net(0), make_teacher(small_net(1))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_update_(teacher, student, 1.0)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    ema_update_(teacher, student, 0.0)
    assert all(torch.equal(student.state_dict()[k], v) for k, v in teacher.state_dict().items())


def test_ema_equals_loop_reference():
    student, teacher = small_net(0), make_teacher(small_net(1))
    expected = {n: 0.7 * t.detach().clone() + 0.3 * s.detach()
                for (n, t), (_, s) in zip(teacher.named_parameters(), student.named_parameters())}
    ema_update_(teacher, student, 0.7)
    for n, p in teacher.named_parameters():
        torch.testing.assert_close(p, expected[n])
        assert not p.requires_grad


def test_ema_does_not_touch_buffers():
    student = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    teacher = make_teacher(student)
    student[1].running_mean.fill_(5.0)
    ema_update_(teacher, student, 0.5)
    assert torch.equal(teacher[1].running_mean, torch.zeros(2))


def test_ema_errors():
    student = small_net()
    with pytest.raises(ValueError, match="same object"):
        ema_update_(student, student, 0.99)
    with pytest.raises(ValueError, match="differ"):
        ema_update_(nn.Sequential(nn.Linear(4, 8)), student, 0.99)
    wrong_shape = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 5), nn.LayerNorm(5))
    with pytest.raises(ValueError, match="shape"):
        ema_update_(wrong_shape, student, 0.99)
    shared = make_teacher(student)
    shared[0].weight = student[0].weight
    with pytest.raises(ValueError, match="shared"):
        ema_update_(shared, student, 0.99)
    with pytest.raises(ValueError, match="momentum"):
        ema_update_(make_teacher(student), student, 1.5)


def test_gram_weight_schedule_hand_computed():
    from dinolite.schedules import gram_weight

    # 7B refinement shape (dinov3_vit7b16_gram_anchor.yaml:64-69 through cosine_lr_scheduler.py's
    # linear_warmup_cosine_decay): off, then a cosine ramp 0 -> 2 over 4 steps (both ends included:
    # 2 (1 - (1 + cos(pi j / 3)) / 2) = 0, 0.5, 1.5, 2), then constant.
    values = [gram_weight(s, 20, 2.0, start_step=10, warmup_steps=4) for s in range(20)]
    assert values[:10] == [0.0] * 10
    assert values[10:14] == pytest.approx([0.0, 0.5, 1.5, 2.0])
    assert values[14:] == [2.0] * 6
    # Cosine to a final value after the ramp: half-way through the cosine part it is the mean.
    assert gram_weight(10 + 2 + 4, 10 + 2 + 8, 1.0, start_step=10, warmup_steps=2, final_weight=0.0) == pytest.approx(0.5)
    assert gram_weight(5, 10, 1.5) == 1.5  # constant from the start


def test_gram_and_local_dino_weights_from_config():
    from dinolite.train.config import apply_overrides
    from dinolite.train.recipes import get_config
    from dinolite.train.optim import schedule_values

    cfg = apply_overrides(get_config("tiny-cpu"), ["gram.weight=2.0", "gram.teacher=somewhere", "gram.start_epoch=2",
                                                   "gram.warmup_epochs=1"])
    before = schedule_values(cfg, 49, 200, 25, 32)
    assert before.gram_weight == 0.0 and before.local_dino_weight == 1.0
    ramp = [schedule_values(cfg, s, 200, 25, 32) for s in (50, 62, 75, 150)]
    # both ramp on the same 25-step cosine (official: two schedules with warmup_epochs S, cosine_epochs W); step 62 is
    # its middle (cos(pi 12 / 24) = 0): Gram 1.0, local DINO 0.75
    assert [v.local_dino_weight for v in ramp] == pytest.approx([1.0, 0.75, 0.5, 0.5])
    assert ramp[0].gram_weight == 0.0 and ramp[1].gram_weight == pytest.approx(1.0)
    assert ramp[2].gram_weight == ramp[3].gram_weight == 2.0
    off = schedule_values(get_config("tiny-cpu"), 150, 200, 25, 32)
    assert off.gram_weight == 0.0 and off.local_dino_weight == 1.0


def test_lr_scaling_rules_hand_computed():
    from dinolite.schedules import scaled_learning_rate

    # DINOv2 dinov2/utils/config.py:25: base x sqrt(B / 1024); DINOv3 dinov3/train/train.py:170: 4 x sqrt(B / 1024);
    # dinov3/train/train.py:164: base x B / 256.
    assert scaled_learning_rate(0.004, 4096) == pytest.approx(0.008)
    assert scaled_learning_rate(0.004, 4096, "sqrt_1024") == pytest.approx(0.008)
    assert scaled_learning_rate(5e-5, 4096, "sqrt_1024_x4") == pytest.approx(4e-4)
    assert scaled_learning_rate(1e-3, 512, "linear_256") == pytest.approx(2e-3)
    assert scaled_learning_rate(1e-3, 512, "none") == 1e-3
    with pytest.raises(ValueError, match="sqrt_1024_x4"):
        scaled_learning_rate(1e-3, 512, "sqrt_wrt_1024")


def test_dinov3_schedule_shapes_hand_computed():
    from dinolite.schedules import warmup_cosine_constant

    # High-resolution stage lr (dinov3_vit7b16_high_res_adapt.yaml:203-209: start 0, peak 0, end E, no warm-up,
    # cosine over 10 epochs): a rise 0 -> E over 10 steps with both ends included, cos(pi j / 9), then E.
    rise = [warmup_cosine_constant(s, 30, 0.0, 0.0, 1.0, 0, 10) for s in (0, 3, 6, 9, 10, 29, 40)]
    assert rise == pytest.approx([0.0, 0.25, 0.75, 1.0, 1.0, 1.0, 1.0])
    # 7B pre-training (start 0, peak = end): linear with endpoint=False over the warm-up, then flat.
    flat = [warmup_cosine_constant(s, 20, 0.0, 2.0, 2.0, 4) for s in (0, 1, 3, 4, 19)]
    assert flat == pytest.approx([0.0, 0.5, 1.5, 2.0, 2.0])
    with pytest.raises(ValueError, match="fit in total_steps"):
        warmup_cosine_constant(0, 10, 0.0, 1.0, 1.0, 8, 5)


def test_lr_rule_and_schedule_are_checked_config_keys():
    from dinolite.train.config import apply_overrides
    from dinolite.train.recipes import get_config

    with pytest.raises(ValueError, match="optim.scaling_rule"):
        apply_overrides(get_config("tiny-cpu"), ["optim.scaling_rule=sqrt_wrt_1024"])
    with pytest.raises(ValueError, match="optim.lr_schedule"):
        apply_overrides(get_config("tiny-cpu"), ["optim.lr_schedule=linear"])
    # Each recipe uses its source's rule: DINOv2 recipes sqrt_1024, the DINOv3 7B recipes sqrt_1024_x4.
    assert get_config("vitg14-lvd142m").optim.scaling_rule == "sqrt_1024"
    assert {get_config(f"dinov3-vit7b16-{s}").optim.scaling_rule for s in ("pretrain", "gram")} == {"sqrt_1024_x4"}
