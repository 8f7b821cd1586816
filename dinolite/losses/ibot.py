"""iBOT patch loss: the student predicts, at masked positions, the teacher's patch prototypes."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class IBOTPatchLoss(nn.Module):
    """Cross-entropy between teacher and student patch distributions on masked patches only.

    loss = (1 / n_global_images) * sum_m w_m * ( -sum_k P_t[m, k] * log_softmax(z_s[m] / T_s)[k] )

    where m runs over the M masked patches of the batch and w_m = 1 / (number of masked
    patches in m's image) (collate_multicrop's masks_weight), so every masked image contributes
    the mean over its masked patches, and the sum is divided by the number of global images
    (2B, masked or not). Computed in float32.

    The teacher probabilities come from the teacher's (unmasked) patch tokens at the same
    positions, sharpened and centred (Sinkhorn-Knopp over all masked patches of the global
    batch, or a patch centre). This module knows nothing about heads: whether the iBOT head is
    the DINO head (tied) or a separate one (untied) is decided by whoever builds the model.
    """

    def __init__(self, student_temp=0.1):
        super().__init__()
        self.student_temp = student_temp

    def forward(self, student_patch_logits_masked, teacher_probs_masked, masks_weight, n_global_images):
        """
        Args:
            student_patch_logits_masked: [M, K] student iBOT-head outputs at the masked patches.
            teacher_probs_masked: [M, K] teacher probabilities at the same patches (rows sum to 1).
            masks_weight: [M] weight of each masked patch (1 / masked patches of its image).
            n_global_images: number of global crops in the local batch (2B), int or 0-dim tensor.
        Returns: scalar float32 loss.
        """
        student, teacher, weight = student_patch_logits_masked, teacher_probs_masked, masks_weight
        if student.ndim != 2 or student.shape != teacher.shape:
            raise ValueError(f"student logits and teacher probs must both be [M, K], got "
                             f"{tuple(student.shape)} and {tuple(teacher.shape)}")
        if weight.shape != student.shape[:1]:
            raise ValueError(f"masks_weight must be [M] = [{student.shape[0]}], got {tuple(weight.shape)}")
        if int(n_global_images) <= 0:
            raise ValueError(f"n_global_images must be positive (it is 2B), got {int(n_global_images)}")
        log_p_student = F.log_softmax(student.float() / self.student_temp, dim=-1)
        cross_entropy = -(teacher.float() * log_p_student).sum(dim=-1)  # [M]
        return (cross_entropy * weight.float()).sum() / n_global_images
