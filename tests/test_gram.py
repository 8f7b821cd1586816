"""gram_loss against hand-computed values and a written-out float64 version of the official procedure."""
import math

import pytest
import torch

from dinolite.losses import gram_loss


def official_procedure(student, teacher, img_level=True, normalize=True, clamp_both=False):
    """REFERENCE.md, written out in float64 with loops: normalise each patch, Gram per image (or over the
    flattened batch), optionally zero negative entries of both, then the mean of squared differences."""
    s, t = student.double(), teacher.double()
    if normalize:
        s = s / s.norm(dim=-1, keepdim=True)
        t = t / t.norm(dim=-1, keepdim=True)
    groups = [(s[b], t[b]) for b in range(s.shape[0])] if img_level else [(s.flatten(0, 1), t.flatten(0, 1))]
    total, count = 0.0, 0
    for xs, xt in groups:
        for i in range(xs.shape[0]):
            for j in range(xs.shape[0]):
                gs, gt = float(xs[i] @ xs[j]), float(xt[i] @ xt[j])
                if clamp_both:
                    gs, gt = max(gs, 0.0), max(gt, 0.0)
                total += (gs - gt) ** 2
                count += 1
    return total / count


def random_patches(seed, batch=3, patches=5, dim=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, patches, dim, generator=g), torch.randn(batch, patches, dim, generator=g)


def test_hand_computed():
    # Student patches orthogonal: G_s = I. Teacher patches identical: G_t = all ones. MSE = (0 + 1 + 1 + 0) / 4.
    student = torch.tensor([[[2.0, 0.0], [0.0, 3.0]]])
    teacher = torch.tensor([[[1.0, 0.0], [5.0, 0.0]]])
    assert gram_loss(student, teacher).item() == pytest.approx(0.5, abs=1e-7)
    # Without normalisation the raw dot products count: G_s = diag(4, 9), G_t = [[1, 5], [5, 25]].
    expected = ((4 - 1) ** 2 + 25 + 25 + (9 - 25) ** 2) / 4
    assert gram_loss(student, teacher, normalize=False).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("img_level", [True, False])
@pytest.mark.parametrize("remove_neg", ["none", "both"])
def test_equals_official_procedure(img_level, remove_neg):
    student, teacher = random_patches(seed=1)
    expected = official_procedure(student, teacher, img_level=img_level, clamp_both=remove_neg == "both")
    loss = gram_loss(student, teacher, img_level=img_level, remove_neg=remove_neg)
    assert loss.dtype == torch.float32
    # Entries are cosines (|G| <= 1) computed with D = 8 fp32 products: errors ~1e-7, far below 1e-5.
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_batch_level_compares_patches_across_images():
    student, teacher = random_patches(seed=2, batch=2)
    per_image = gram_loss(student, teacher, img_level=True).item()
    whole_batch = gram_loss(student, teacher, img_level=False).item()
    assert abs(per_image - whole_batch) > 1e-3
    assert gram_loss(student[:1], teacher[:1], img_level=False).item() == pytest.approx(
        gram_loss(student[:1], teacher[:1]).item(), rel=1e-6)


def test_remove_negative_modes_hand_computed():
    teacher = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])  # G_t off-diagonal -1
    opposite = torch.tensor([[[1.0, 0.0], [-0.6, 0.8]]])  # G_s off-diagonal -0.6
    agreeing = torch.tensor([[[1.0, 0.0], [0.6, 0.8]]])  # G_s off-diagonal +0.6
    assert gram_loss(opposite, teacher).item() == pytest.approx(2 * 0.4 ** 2 / 4, abs=1e-6)
    assert gram_loss(agreeing, teacher).item() == pytest.approx(2 * 1.6 ** 2 / 4, abs=1e-6)
    # "both": negatives of both are 0.
    assert gram_loss(opposite, teacher, remove_neg="both").item() == pytest.approx(0.0, abs=1e-7)
    assert gram_loss(agreeing, teacher, remove_neg="both").item() == pytest.approx(2 * 0.6 ** 2 / 4, abs=1e-6)
    # "teacher": a negative teacher similarity is a target of 0, and a student that is negative there too is
    # not penalised. (The official option zeroes the teacher first, so its student test never fires and the
    # first case would cost 2 * 0.6**2 / 4 = 0.18.)
    assert gram_loss(opposite, teacher, remove_neg="teacher").item() == pytest.approx(0.0, abs=1e-7)
    assert gram_loss(agreeing, teacher, remove_neg="teacher").item() == pytest.approx(2 * 0.6 ** 2 / 4, abs=1e-6)
    # A negative student where the teacher is positive is still pulled up in "teacher" mode, not in "both".
    positive_teacher = agreeing
    assert gram_loss(opposite, positive_teacher, remove_neg="teacher").item() == pytest.approx(
        2 * 1.2 ** 2 / 4, abs=1e-6)
    assert gram_loss(opposite, positive_teacher, remove_neg="both").item() == pytest.approx(2 * 0.6 ** 2 / 4, abs=1e-6)


def test_constrains_relations_not_features():
    # Rotating the student's feature space changes every feature but no cosine: the loss is unchanged.
    student, teacher = random_patches(seed=3)
    rotation, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(4)))
    rotated = student @ rotation
    assert (rotated - student).abs().max() > 0.5
    assert gram_loss(rotated, teacher).item() == pytest.approx(gram_loss(student, teacher).item(), rel=1e-5)
    assert gram_loss(student, student).item() < 1e-12


def test_fp32_under_autocast_and_gradient_to_student_only():
    student, teacher = random_patches(seed=5)
    student.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = gram_loss(student.bfloat16(), teacher.bfloat16())
    assert loss.dtype == torch.float32
    expected = official_procedure(student.detach().bfloat16().float(), teacher.bfloat16().float())
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    assert not teacher.requires_grad


def test_bad_input():
    student, teacher = random_patches(seed=6)
    with pytest.raises(ValueError, match="same shape"):
        gram_loss(student, teacher[:, :4])
    with pytest.raises(ValueError, match=r"\[B, P, D\]"):
        gram_loss(student[0], teacher[0])
    with pytest.raises(ValueError, match="remove_neg"):
        gram_loss(student, teacher, remove_neg="student")
    assert math.isfinite(gram_loss(student, teacher).item())
