"""The DINO [CLS] loss: cross-entropy between teacher targets and student predictions over crop pairs.

For a student crop s and a teacher crop t (both views of the same images):

    CE(s, t) = mean_b  - sum_k  P_t[b, k] * log_softmax(z_s[b] / 0.1)[k]

Pairs: every local crop against every teacher global crop, and every global crop against every
*other* teacher global crop (a crop is never matched with its own view). The loss is the average
over all n_g * (n_g - 1) + n_l * n_g pairs: 2 + 16 = 18 for 2 global and 8 local crops. This equals
DINOv2's normalisation (2 * global term + local term) / 18 and DINOv3's all-pairs average with the
diagonal removed.

DINOv3 lowers the weight of the local-crop pairs when Gram anchoring starts (1 -> 0.5): `local_weight`
multiplies the local pairs' sum, and the normaliser stays the number of pairs.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class DINOLoss(nn.Module):
    def __init__(self, student_temp: float = 0.1):
        super().__init__()
        if not student_temp > 0:
            raise ValueError(f"student_temp must be > 0, got {student_temp}")
        self.student_temp = student_temp

    @staticmethod
    def num_pairs(n_global: int, n_local: int) -> int:
        """Number of (student crop, teacher crop) pairs the loss averages over."""
        return n_global * (n_global - 1) + n_local * n_global

    def forward(self, student_global: torch.Tensor, student_local: torch.Tensor | None,
                teacher_probs: torch.Tensor, local_weight: float = 1.0) -> torch.Tensor:
        """student_global [n_g, B, K] logits, student_local [n_l, B, K] logits or None,
        teacher_probs [n_g, B, K] (centred, sharpened targets) -> fp32 scalar.
        local_weight scales the local-crop pairs (1.0: the plain average over all pairs).

        Crop i of student_global and crop i of teacher_probs must be the same view.
        """
        if student_global.ndim != 3 or teacher_probs.shape != student_global.shape:
            raise ValueError("expected student_global and teacher_probs of the same shape [n_global, B, K], got "
                             f"{tuple(student_global.shape)} and {tuple(teacher_probs.shape)}; "
                             "reshape flat [n_global * B, K] outputs with .view(n_global, B, K) (crop-major)")
        n_global, batch, _ = student_global.shape
        if student_local is not None and (student_local.ndim != 3 or student_local.shape[1:] != student_global.shape[1:]):
            raise ValueError(f"expected student_local [n_local, {batch}, {student_global.shape[2]}], "
                             f"got {tuple(student_local.shape)}")
        n_local = 0 if student_local is None else student_local.shape[0]
        n_pairs = self.num_pairs(n_global, n_local)
        if n_pairs == 0:
            raise ValueError("no crop pairs: DINO needs at least 2 global crops or 1 global and 1 local crop")

        # fp32 even under autocast (which would run the products in bf16).
        with torch.autocast(device_type=student_global.device.type, enabled=False):
            teacher = teacher_probs.float()
            # Each student crop is scored against the sum of the teacher crops it is paired with: all of
            # them for a local crop, all but its own view for a global crop. The K-long dot products are
            # elementwise products reduced by torch.sum, whose cascaded fp32 summation stays within ~1e-7
            # of a float64 reference at K = 65536 (a matmul/einsum accumulates sequentially and drifts by
            # ~1e-4 there, which matters for the logged "flat at ln K" value).
            teacher_sum = teacher.sum(dim=0)  # [B, K]
            global_log_probs = F.log_softmax(student_global.float() / self.student_temp, dim=-1)
            total = ((teacher_sum - teacher) * global_log_probs).sum()  # same-view pairs excluded
            if n_local > 0:
                local_log_probs = F.log_softmax(student_local.float() / self.student_temp, dim=-1)
                total = total + local_weight * (teacher_sum * local_log_probs).sum()
            return -total / (batch * n_pairs)
