"""Gram anchoring (DINOv3): keep the student's patch-similarity structure close to an earlier teacher's.

For the patch features X [P, D] of one image, L2-normalised per patch, the Gram matrix G = X X^T [P, P]
holds every patch-to-patch cosine similarity. The loss compares the student's Gram matrix with the
Gram teacher's:

    L_Gram = mean over images and entries of (G_student - G_teacher)^2

i.e. the official MSE (the mean over all B * P * P entries), not the paper's Frobenius norm
||G_s - G_t||_F^2 (a sum): the two differ by the constant factor B * P^2. It constrains how patches
relate to each other, not the features themselves: any rotation of the student's feature space
leaves the loss unchanged.
"""
import torch
import torch.nn.functional as F

REMOVE_NEG_MODES = ("none", "both", "teacher")


def gram_loss(student_patches: torch.Tensor, teacher_patches: torch.Tensor, img_level: bool = True,
              normalize: bool = True, remove_neg: str = "none") -> torch.Tensor:
    """Student and teacher patch features [B, P, D] -> fp32 scalar (also under autocast).

    img_level: True: one Gram matrix per image, [B, P, P] (the 7B refinement config). False: one Gram
        matrix over the whole batch, [B*P, B*P] (the official library default): patches of different
        images are compared too.
    normalize: L2-normalise every patch feature first (cosine similarities; every released config).
    remove_neg: what to do with negative similarities (off, "none", in every released config).
        "both": set negative entries of both Gram matrices to 0 (as officially).
        "teacher": where the teacher's similarity is negative, its target is 0 and a negative student
            similarity there is not penalised (set to 0 too); elsewhere the student is compared as is.
            The official option of that name first zeroes the teacher's negatives and then tests for
            negative teacher entries to zero the student's, which can no longer be true: officially it
            only clamps the teacher. Ours applies the student mask the name describes.
    """
    if student_patches.ndim != 3 or student_patches.shape != teacher_patches.shape:
        raise ValueError("gram_loss expects student and teacher patch features of the same shape [B, P, D], got "
                         f"{tuple(student_patches.shape)} and {tuple(teacher_patches.shape)}; resize the teacher's "
                         "patch grid to the student's first (high-resolution teacher)")
    if remove_neg not in REMOVE_NEG_MODES:
        raise ValueError(f"remove_neg must be one of {REMOVE_NEG_MODES}, got {remove_neg!r}")
    with torch.autocast(device_type=student_patches.device.type, enabled=False):
        student, teacher = student_patches.float(), teacher_patches.float()
        if normalize:
            student, teacher = F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
        if not img_level:
            student, teacher = student.flatten(0, 1).unsqueeze(0), teacher.flatten(0, 1).unsqueeze(0)
        student_gram = student @ student.transpose(1, 2)  # [B, P, P] or [1, B*P, B*P]
        teacher_gram = teacher @ teacher.transpose(1, 2)
        if remove_neg == "both":
            student_gram, teacher_gram = student_gram.clamp(min=0), teacher_gram.clamp(min=0)
        elif remove_neg == "teacher":
            teacher_negative = teacher_gram < 0
            teacher_gram = teacher_gram.clamp(min=0)
            student_gram = student_gram.masked_fill(teacher_negative & (student_gram < 0), 0.0)
        return F.mse_loss(student_gram, teacher_gram)
