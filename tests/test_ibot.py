import math

import pytest
import torch

from dinolite.losses import IBOTPatchLoss
from dinolite.masking import MaskingGenerator, collate_multicrop


def loop_reference(student_logits, teacher_probs, masks, student_temp=0.1):
    """Per image, mean over its masked patches of the cross-entropy; sum over images / n_images."""
    total, k = 0.0, 0
    for image_mask in masks.tolist():
        n_masked = sum(image_mask)
        for masked in image_mask:
            if not masked:
                continue
            z = [v / student_temp for v in student_logits[k].tolist()]
            log_norm = math.log(sum(math.exp(v - max(z)) for v in z)) + max(z)
            total += -sum(p * (v - log_norm) for p, v in zip(teacher_probs[k].tolist(), z)) / n_masked
            k += 1
    return total / len(masks)


def test_hand_computed_value():
    # K = 2, uniform student: each patch's cross-entropy is log 2 whatever the teacher says.
    # Image 0 has 2 masked patches (weight 1/2), image 1 has 1, images 2 and 3 none: (1 + 1) log 2 / 4.
    student = torch.zeros(3, 2)
    teacher = torch.tensor([[1.0, 0.0], [0.3, 0.7], [0.5, 0.5]])
    weight = torch.tensor([0.5, 0.5, 1.0])
    loss = IBOTPatchLoss()(student, teacher, weight, n_global_images=4)
    assert loss.item() == pytest.approx(math.log(2) / 2, abs=1e-7)


def test_matches_per_patch_loop_on_a_collated_batch():
    torch.manual_seed(0)
    batch = [dict(global_crops=[torch.zeros(3, 32, 32)] * 2, local_crops=[]) for _ in range(4)]
    out = collate_multicrop(batch, MaskingGenerator(8, generator=0), patch_size=4, generator=0)
    m, k = out["n_masked_patches"].item(), 7
    assert m > 0
    student = torch.randn(m, k) * 3
    teacher = torch.softmax(torch.randn(m, k) * 5, dim=-1)
    loss = IBOTPatchLoss()(student, teacher, out["masks_weight"], n_global_images=len(out["masks"]))
    assert loss.item() == pytest.approx(loop_reference(student, teacher, out["masks"]), rel=1e-5)


def test_student_temperature_and_gradient():
    torch.manual_seed(1)
    student = torch.randn(5, 4, requires_grad=True)
    teacher = torch.softmax(torch.randn(5, 4), -1)
    weight = torch.full((5,), 0.2)
    loss = IBOTPatchLoss(student_temp=0.5)(student, teacher, weight, 2)
    expected = -(teacher * torch.log_softmax(student / 0.5, -1)).sum(-1).mul(weight).sum() / 2
    assert torch.allclose(loss, expected)
    loss.backward()
    # d/dz of CE(P_t, softmax(z/T)) = (softmax(z/T) - P_t) / T, times weight / n_images
    expected_grad = (torch.softmax(student.detach() / 0.5, -1) - teacher) / 0.5 * 0.2 / 2
    assert torch.allclose(student.grad, expected_grad, atol=1e-6)


def test_low_precision_inputs_give_fp32():
    torch.manual_seed(2)
    student = torch.randn(6, 8)
    teacher = torch.softmax(torch.randn(6, 8), -1)
    weight = torch.full((6,), 1 / 3)
    ref = IBOTPatchLoss()(student, teacher, weight, 4)
    for dtype in (torch.float16, torch.bfloat16):
        loss = IBOTPatchLoss()(student.to(dtype), teacher.to(dtype), weight.to(dtype), 4)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        assert loss.item() == pytest.approx(ref.item(), rel=2e-2)


def test_no_masked_patches_gives_zero():
    loss = IBOTPatchLoss()(torch.zeros(0, 5), torch.zeros(0, 5), torch.zeros(0), 8)
    assert loss.item() == 0.0


def test_bad_shapes():
    with pytest.raises(ValueError, match=r"\[M, K\]"):
        IBOTPatchLoss()(torch.zeros(3, 5), torch.zeros(3, 4), torch.zeros(3), 2)
    with pytest.raises(ValueError, match="masks_weight"):
        IBOTPatchLoss()(torch.zeros(3, 5), torch.zeros(3, 5), torch.zeros(2), 2)
    with pytest.raises(ValueError, match="n_global_images"):
        IBOTPatchLoss()(torch.zeros(3, 5), torch.zeros(3, 5), torch.zeros(3), 0)
