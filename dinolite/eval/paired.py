"""Is one model really better than another on the same test set? A paired (sign) test.

Two accuracies measured on the same N queries differ by chance more than their gap suggests when N is small:
500 queries resolve about 2 points at best. The paired view counts only the queries where the two disagree
(one right, the other wrong): under "neither is better" each such query is a fair coin (McNemar's exact test).
"""
import math

import torch


def paired_sign_test(correct_a: torch.Tensor, correct_b: torch.Tensor) -> dict:
    """correct_a, correct_b: bool [N], whether models a and b got each of the same N queries right.

    Returns dict(a_only, b_only: queries only a (only b) got right; p_value: the two-sided exact binomial
    probability, under a fair coin on the a_only + b_only disagreements, of a split at least as uneven;
    gap: accuracy of a minus b in points).
    """
    a, b = torch.as_tensor(correct_a).bool().flatten(), torch.as_tensor(correct_b).bool().flatten()
    if a.shape != b.shape or a.numel() == 0:
        raise ValueError(f"need two equally long, non-empty per-query results, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    a_only, b_only = int((a & ~b).sum()), int((b & ~a).sum())
    n, k = a_only + b_only, min(a_only, b_only)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n  # P(X <= k), X ~ Binomial(n, 1/2)
    return {"a_only": a_only, "b_only": b_only, "p_value": min(1.0, 2 * tail),
            "gap": 100.0 * (a.float().mean() - b.float().mean()).item()}
