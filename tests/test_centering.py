import math

import pytest
import torch

from dinolite.centering import SoftmaxCenter, sinkhorn_knopp
from tests.distributed_utils import run_distributed


def official_sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations=3, dtype=torch.float32):
    """Direct transcription of the official steps (REFERENCE.md), no max-subtraction. Single process."""
    q = torch.exp(teacher_logits.to(dtype) / teacher_temp).t()  # [K, B]
    num_prototypes, batch = q.shape
    q = q / q.sum()
    for _ in range(n_iterations):
        q = q / q.sum(dim=1, keepdim=True)
        q = q / num_prototypes
        q = q / q.sum(dim=0, keepdim=True)
        q = q / batch
    q = q * batch
    return q.t()


# ---------------------------------------------------------------- Sinkhorn-Knopp

def test_sk_hand_computed_2x2():
    # logits/T = [[ln 3, 0], [0, 0]]: Q (K x B) = [[3, 1], [1, 1]] / 6.
    # Iteration 1: rows / row sums / K    -> [[3/8, 1/8], [1/4, 1/4]]  (each prototype: mass 1/2)
    #              columns / col sums / B -> [[3/10, 1/6], [1/5, 1/3]] (each sample: mass 1/2)
    # Output Q^T * B: [[3/5, 2/5], [1/3, 2/3]]: sample 1 is pushed towards the under-used prototype.
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    out = sinkhorn_knopp(logits, teacher_temp=1.0, n_iterations=1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([[0.6, 0.4], [1 / 3, 2 / 3]]), atol=1e-7, rtol=0)


@pytest.mark.parametrize("n_iterations", [0, 1, 3, 10])
def test_sk_equals_official_where_finite(n_iterations):
    torch.manual_seed(0)
    logits = torch.randn(32, 100) * 0.5
    ours = sinkhorn_knopp(logits, 0.07, n_iterations)
    official = official_sinkhorn_knopp(logits, 0.07, n_iterations)
    assert torch.isfinite(official).all()
    torch.testing.assert_close(ours, official, atol=1e-6, rtol=1e-6)  # (0 iterations: values up to ~20)


def test_sk_rows_sum_to_one_and_prototypes_get_equal_mass():
    torch.manual_seed(1)
    batch, num_prototypes = 24, 8
    logits = torch.randn(batch, num_prototypes) + torch.linspace(0, 2, num_prototypes)  # skewed usage
    out3 = sinkhorn_knopp(logits, 0.5, 3)
    torch.testing.assert_close(out3.sum(dim=1), torch.ones(batch), atol=1e-6, rtol=0)
    # After 3 iterations the prototype marginals are only approximately equal ...
    err3 = (out3.sum(dim=0) - batch / num_prototypes).abs().max()
    # ... and converge with more iterations: each prototype gets B/K (= 1/K of the total mass B).
    out200 = sinkhorn_knopp(logits, 0.5, 200)
    err200 = (out200.sum(dim=0) - batch / num_prototypes).abs().max()
    assert err200 < 1e-5 < err3
    torch.testing.assert_close(out200.sum(dim=1), torch.ones(batch), atol=1e-6, rtol=0)
    # Not "doubly stochastic with rows and columns summing to 1": columns sum to B/K = 3.
    assert abs(out200.sum(dim=0)[0].item() - 3.0) < 1e-4


def test_sk_stable_at_low_temperature():
    torch.manual_seed(2)
    logits = torch.randn(16, 64)
    logits = 10 * logits / logits.abs().amax()  # magnitude 10, logits / 0.04 reach 250 > 88
    official32 = official_sinkhorn_knopp(logits, 0.04, 3)
    assert not torch.isfinite(official32).all()  # exp overflows in fp32
    reference64 = official_sinkhorn_knopp(logits, 0.04, 3, dtype=torch.float64)  # exp(250) fits in fp64
    assert torch.isfinite(reference64).all()
    ours = sinkhorn_knopp(logits, 0.04, 3)
    assert torch.isfinite(ours).all()
    # logits / T ~ 250 carry an fp32 rounding of ~250 * 6e-8 = 1.5e-5 in the exponent.
    torch.testing.assert_close(ours.double(), reference64, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.sum(dim=1), torch.ones(16), atol=1e-5, rtol=0)


def test_sk_accepts_bf16_and_returns_fp32():
    torch.manual_seed(3)
    logits = torch.randn(8, 16).bfloat16()
    out = sinkhorn_knopp(logits, 0.1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, official_sinkhorn_knopp(logits.float(), 0.1), atol=1e-6, rtol=0)


def test_sk_bad_input():
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        sinkhorn_knopp(torch.zeros(2, 3, 4), 0.1)
    with pytest.raises(ValueError, match="teacher_temp"):
        sinkhorn_knopp(torch.zeros(2, 3), 0.0)
    with pytest.raises(ValueError, match="n_iterations"):
        sinkhorn_knopp(torch.zeros(2, 3), 0.1, n_iterations=-1)


# ---------------------------------------------------------------- EMA centre

def test_center_lag_over_three_steps():
    center = SoftmaxCenter(out_dim=2, momentum=0.9)
    temp = 0.5
    t1 = torch.tensor([[1.0, 3.0], [3.0, 5.0]])  # mean [2, 4]
    t2 = torch.tensor([[0.0, 0.0], [2.0, 2.0]])  # mean [1, 1]
    t3 = torch.tensor([[0.0, 0.0]])

    # Step 1: centre is 0.
    p1 = center(t1, temp)
    torch.testing.assert_close(p1, torch.softmax(t1 / temp, dim=-1))
    center.update(t1)
    # The update is pending: the buffer still holds the old centre (one step of lag) ...
    torch.testing.assert_close(center.center, torch.zeros(1, 2))

    # Step 2: ... and is applied before batch 2 is centred: c = 0.9 * 0 + 0.1 * [2, 4] = [0.2, 0.4].
    p2 = center(t2, temp)
    torch.testing.assert_close(center.center, torch.tensor([[0.2, 0.4]]))
    # row [0, 0]: softmax([-0.4, -0.8]) -> p0 = 1 / (1 + e^-0.4) = 0.598687660
    torch.testing.assert_close(p2[0], torch.tensor([0.598687660, 0.401312340]), atol=1e-6, rtol=0)
    center.update(t2)

    # Step 3: c = 0.9 * [0.2, 0.4] + 0.1 * [1, 1] = [0.28, 0.46]; softmax([-0.56, -0.92]):
    # p0 = 1 / (1 + e^-0.36) = 0.589040434
    p3 = center(t3, temp)
    torch.testing.assert_close(center.center, torch.tensor([[0.28, 0.46]]))
    torch.testing.assert_close(p3[0], torch.tensor([0.589040434, 0.410959566]), atol=1e-6, rtol=0)


def test_center_state_dict_contains_pending_update():
    center = SoftmaxCenter(out_dim=3, momentum=0.5)
    assert "center" in center.state_dict()
    center.update(torch.tensor([[2.0, 4.0, 6.0]]))
    state = center.state_dict()
    torch.testing.assert_close(state["center"], torch.tensor([[1.0, 2.0, 3.0]]))
    # Resuming from it centres the next batch exactly as the uninterrupted run does.
    resumed = SoftmaxCenter(out_dim=3, momentum=0.5)
    resumed.load_state_dict(state)
    batch = torch.tensor([[0.0, 1.0, 0.0]])
    torch.testing.assert_close(resumed(batch, 0.1), center(batch, 0.1))


def test_center_bad_input():
    center = SoftmaxCenter(out_dim=4)
    with pytest.raises(ValueError, match=r"\[B, 4\]"):
        center(torch.zeros(2, 5), 0.1)
    with pytest.raises(ValueError, match="momentum"):
        SoftmaxCenter(4, momentum=1.5)


# ---------------------------------------------------------------- distributed: 2 ranks == 1 rank

def _distributed_worker(rank, world_size, logits):
    half = logits.shape[0] // world_size
    local = logits[rank * half:(rank + 1) * half]
    sk = sinkhorn_knopp(local, 0.04, 3)
    center = SoftmaxCenter(logits.shape[1], momentum=0.9)
    center(local, 0.1)
    center.update(local)
    probs = center(local, 0.1)
    # iBOT: ranks hold different numbers of masked patches (4 and 8 rows; then 0 and 12).
    uneven = sinkhorn_knopp(logits[:4] if rank == 0 else logits[4:13], 0.04, 3)
    empty = sinkhorn_knopp(logits[:0] if rank == 0 else logits, 0.04, 3)
    # iBOT patch centre: 3 masked patches on rank 0, 9 on rank 1; then none on rank 0.
    patch_center = SoftmaxCenter(logits.shape[1], momentum=0.9)
    patch_center.update(logits[:3] if rank == 0 else logits[3:])
    patch_center.apply_pending_update()
    patch_center.update(logits[:0] if rank == 0 else logits[:5])
    patch_center.apply_pending_update()
    return sk, center.center.clone(), probs, uneven, empty, patch_center.center.clone()


def test_distributed_two_ranks_equal_one_rank():
    torch.manual_seed(4)
    logits = 10 * torch.randn(12, 32)  # also exercises the overflow-safe path across ranks
    results = run_distributed(_distributed_worker, world_size=2, args=(logits,))
    sk_full = sinkhorn_knopp(logits, 0.04, 3)
    torch.testing.assert_close(torch.cat([r[0] for r in results]), sk_full, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat([r[3] for r in results]), sinkhorn_knopp(logits[:13], 0.04, 3),
                               atol=1e-5, rtol=0)
    assert results[0][4].shape == (0, 32)
    torch.testing.assert_close(results[1][4], sk_full, atol=1e-5, rtol=0)
    center = SoftmaxCenter(32, momentum=0.9)
    center(logits, 0.1)
    center.update(logits)
    probs_full = center(logits, 0.1)
    for _, rank_center, *_ in results:
        torch.testing.assert_close(rank_center, center.center)
    torch.testing.assert_close(torch.cat([r[2] for r in results]), probs_full)
    # Unequal row counts: every rank holds the same centre, 0.1 * (mean of rank 0 + mean of rank 1) / 2
    # (the official rule: each rank's mean, averaged over ranks), then a step where only rank 1 has rows.
    first = 0.1 * (logits[:3].mean(0) + logits[3:].mean(0)) / 2
    expected = 0.9 * first + 0.1 * logits[:5].mean(0)
    for r in results:
        torch.testing.assert_close(r[5], expected.unsqueeze(0), atol=1e-6, rtol=1e-6)
