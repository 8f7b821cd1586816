import copy
import math

import pytest
import torch
import torch.nn.functional as F

from dinolite.monitor import (
    CollapseMonitor,
    check_teacher,
    collapse_metrics,
    diagnose,
    effective_rank,
    kl_teacher_student,
    mean_prediction_entropy,
    per_dim_std,
    teacher_entropy,
)


def test_uniform_probs_have_entropy_ln_k():
    for K in (2, 7, 4096):
        probs = torch.full((5, K), 1.0 / K)
        assert teacher_entropy(probs).item() == pytest.approx(math.log(K), rel=1e-5)
        assert mean_prediction_entropy(probs).item() == pytest.approx(math.log(K), rel=1e-5)
    assert math.log(4096) == pytest.approx(8.318, abs=1e-3)  # REFERENCE: loss flat at 8.318 for K = 4096


def test_one_hot_entropies():
    K = 10
    same = F.one_hot(torch.full((8,), 3), K).float()  # every sample on prototype 3
    assert teacher_entropy(same).item() == 0.0
    assert mean_prediction_entropy(same).item() == 0.0
    spread = F.one_hot(torch.arange(8) % 4, K).float()  # sharp, but 4 prototypes used equally
    assert teacher_entropy(spread).item() == 0.0
    assert mean_prediction_entropy(spread).item() == pytest.approx(math.log(4), rel=1e-6)


def test_entropy_hand_computed():
    probs = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    # row entropies ln 2 and 0 -> mean ln2 / 2; mean prediction (0.75, 0.25, 0)
    assert teacher_entropy(probs).item() == pytest.approx(math.log(2) / 2, rel=1e-6)
    expected = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert mean_prediction_entropy(probs).item() == pytest.approx(expected, rel=1e-6)


def test_kl_hand_computed_and_loss_identity():
    teacher = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    student_logits = torch.tensor([[0.0, 0.1], [0.2, -0.1]])
    T = 0.1
    q = torch.softmax(student_logits / T, dim=-1)
    expected = sum(
        sum(teacher[b, k].item() * math.log(teacher[b, k].item() / q[b, k].item()) for k in range(2)) for b in range(2)
    ) / 2
    assert kl_teacher_student(teacher, student_logits, T).item() == pytest.approx(expected, rel=1e-5)
    # DINO cross-entropy = KL + teacher entropy
    ce = -(teacher * torch.log_softmax(student_logits / T, -1)).sum(-1).mean()
    assert ce.item() == pytest.approx(expected + teacher_entropy(teacher).item(), rel=1e-5)
    # identical distributions -> 0
    assert kl_teacher_student(q, student_logits, T).item() == pytest.approx(0.0, abs=1e-6)


def test_probability_validation():
    with pytest.raises(ValueError, match="logits"):
        teacher_entropy(torch.randn(4, 8))
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        teacher_entropy(torch.full((8,), 1 / 8))
    with pytest.raises(ValueError, match="same shape"):
        kl_teacher_student(torch.full((2, 4), 0.25), torch.zeros(2, 5))


def test_per_dim_std_scales():
    torch.manual_seed(0)
    D = 64
    spread = torch.randn(4000, D)  # directions uniform on the sphere
    assert per_dim_std(spread).item() == pytest.approx(1 / math.sqrt(D), rel=0.05)
    collapsed = torch.randn(1, D).repeat(100, 1) * torch.rand(100, 1) * 5 + 1e-4 * torch.randn(100, D)
    assert per_dim_std(collapsed).item() < 0.01 / math.sqrt(D)
    # hand-computed: unit vectors e1 and e2 -> per-dim std (ddof=1) is sqrt(0.5) on 2 dims, 0 on the third
    x = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    assert per_dim_std(x).item() == pytest.approx(2 * math.sqrt(0.5) / 3, rel=1e-6)


def test_effective_rank():
    torch.manual_seed(0)
    D, B = 32, 2000
    for r in (1, 3, 10):
        basis = torch.linalg.qr(torch.randn(D, r))[0].T  # r orthonormal rows
        features = torch.randn(B, r) @ basis
        assert effective_rank(features).item() == pytest.approx(r, rel=0.05)
        assert effective_rank(features).item() <= r + 1e-4
    # hand-computed: singular values (3, 1) -> p = (0.75, 0.25)
    x = torch.diag(torch.tensor([3.0, 1.0]))
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert effective_rank(x).item() == pytest.approx(expected, rel=1e-6)
    assert effective_rank(torch.ones(5, 4)).item() == pytest.approx(1.0)
    assert effective_rank(torch.ones(5, 4), center=True).item() == 0.0


def test_diagnose_names_each_symptom():
    K, B, D = 4096, 64, 192
    torch.manual_seed(0)
    healthy_probs = torch.softmax(torch.randn(B, K) * 10, dim=-1)
    healthy = collapse_metrics(healthy_probs, features=torch.randn(B, D))
    assert diagnose(healthy, loss=5.0) is None

    uniform = collapse_metrics(torch.full((B, K), 1.0 / K), features=torch.randn(B, D))
    message = diagnose(uniform, loss=math.log(K))
    assert "UNIFORM COLLAPSE" in message and "ONE-HOT" not in message and "same object" in message
    assert "UNIFORM COLLAPSE" in diagnose({}, loss=8.318, num_prototypes=K)  # from the loss alone

    one_hot = collapse_metrics(F.one_hot(torch.zeros(B, dtype=torch.long), K).float())
    message = diagnose(one_hot, loss=0.0)
    assert "ONE-HOT COLLAPSE" in message and "UNIFORM" not in message and "centering" in message

    rank = collapse_metrics(features=torch.randn(1, D).repeat(B, 1) + 1e-5 * torch.randn(B, D))
    message = diagnose(rank)
    assert "FEATURE (RANK) COLLAPSE" in message and "effective rank" in message


def test_check_teacher():
    student = torch.nn.Linear(3, 3)
    assert "same object" in check_teacher(student, student)
    teacher = copy.deepcopy(student)
    assert "requires_grad" in check_teacher(teacher, student)
    teacher.requires_grad_(False)
    assert check_teacher(teacher, student) is None
    shared = torch.nn.Linear(3, 3)
    shared.weight = student.weight
    assert "shares 1 parameter" in check_teacher(shared, student)


def test_collapse_monitor_patience():
    K, B = 16, 32
    monitor = CollapseMonitor(num_prototypes=K, patience=3)
    uniform = torch.full((B, K), 1.0 / K)
    outputs = [monitor.update(loss=math.log(K), teacher_probs=uniform) for _ in range(3)]
    assert outputs[:2] == [None, None] and "UNIFORM COLLAPSE" in outputs[2]
    assert outputs[2].startswith("step 2:")
    assert len(monitor.history) == 3 and monitor.history[0]["teacher_entropy"] == pytest.approx(math.log(K), rel=1e-5)
    # a healthy step resets the streak
    healthy = F.one_hot(torch.arange(B) % K, K).float()
    assert monitor.update(loss=2.0, teacher_probs=healthy) is None
    assert monitor.update(loss=math.log(K), teacher_probs=uniform) is None
    with pytest.raises(ValueError, match="prototypes"):
        monitor.update(teacher_probs=torch.full((B, 8), 1 / 8))


def test_below_start_warning_after_two_evaluations_in_a_row_once():
    from dinolite.monitor import BelowStartWarning

    watch = BelowStartWarning("kNN", patience=2)
    said = [watch.update(value, step) for step, value in enumerate([50.0, 49.0, 51.0, 48.0, 47.0, 46.0, 45.0])]
    # 50 is the reference; 49 is one below, 51 resets, 48 and 47 make two in a row: one warning, at step 4.
    assert [i for i, message in enumerate(said) if message] == [4]
    assert "is 47, below its first value 50" in said[4] and "optim.base_lr" in said[4]
    assert "loss.teacher_temp" in said[4]
    with pytest.raises(ValueError, match="patience"):
        BelowStartWarning("kNN", patience=0)
    with pytest.raises(ValueError, match="fraction"):
        BelowStartWarning("rank", fraction=0)


def test_below_start_warning_with_a_fraction_ignores_a_healthy_dip():
    from dinolite.monitor import BelowStartWarning

    # The effective rank of a healthy run on textures (first monitor steps, measured with small-photos as it was
    # before issue 21: base lr 0.01, KoLeo 0.5): a dip to 0.73 x the first value, then growth. With fraction
    # 0.5 it is not a warning; a collapse to a few dimensions is, after two evaluations in a row under 15.19.
    healthy = [30.38, 26.2, 23.81, 23.76, 23.36, 22.12, 22.24, 22.57, 24.38, 25.33]
    watch = BelowStartWarning("rank", patience=2, fraction=0.5)
    assert not any(watch.update(v, step) for step, v in enumerate(healthy))
    watch = BelowStartWarning("rank", patience=2, fraction=0.5)
    said = [watch.update(v, step) for step, v in enumerate([30.38, 16.0, 15.0, 4.0, 2.0])]
    assert [i for i, message in enumerate(said) if message] == [3]
    assert "below 0.5 x its first value 30.38" in said[3]
