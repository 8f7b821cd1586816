import math

import pytest
import torch

from dinolite.losses import KoLeoLoss, koleo_loss
from tests.distributed_utils import run_distributed


def brute_force_koleo(features):
    """O(B^2) float64: -(1/B) sum_i log min_{j != i} ||f_i - f_j|| on normalised features."""
    f = [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in features.double().tolist()]
    total = 0.0
    for i, fi in enumerate(f):
        nearest = min(math.dist(fi, fj) for j, fj in enumerate(f) if j != i)
        total += math.log(nearest)
    return -total / len(f)


def test_hand_computed_values():
    # Two orthogonal unit vectors are sqrt(2) apart: loss = -log sqrt(2).
    loss = koleo_loss(torch.tensor([[3.0, 0.0], [0.0, 0.5]]))
    assert loss.item() == pytest.approx(-0.5 * math.log(2), abs=1e-6)
    # Square on the circle: nearest neighbours at distance sqrt(2); the antipode (2) is not the nearest.
    square = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    assert koleo_loss(square).item() == pytest.approx(-0.5 * math.log(2), abs=1e-6)


@pytest.mark.parametrize("batch,dim", [(2, 3), (7, 5), (64, 16), (33, 384)])
def test_matches_brute_force_float64(batch, dim):
    torch.manual_seed(batch)
    x = torch.randn(batch, dim) * 4 + 1
    assert koleo_loss(x).item() == pytest.approx(brute_force_koleo(x), rel=1e-5, abs=1e-5)


def test_gradient_matches_float64_autograd():
    torch.manual_seed(0)
    x = torch.randn(16, 8, dtype=torch.float64)
    ref = x.clone().requires_grad_()
    f = torch.nn.functional.normalize(ref, dim=-1)
    d = torch.cdist(f, f) + torch.diag(torch.full((16,), float("inf"), dtype=torch.float64))
    (-d.min(1).values.log().mean()).backward()
    ours = x.float().requires_grad_()
    koleo_loss(ours).backward()
    assert ours.grad.abs().sum() > 0
    assert torch.allclose(ours.grad.double(), ref.grad, rtol=1e-4, atol=1e-5)


def test_spreading_lowers_the_loss():
    # Points bunched in a small cap score higher (worse) than the same number spread on the sphere.
    torch.manual_seed(0)
    bunched = torch.tensor([1.0, 0.0, 0.0]) + 0.05 * torch.randn(32, 3)
    spread = torch.randn(32, 3)
    assert koleo_loss(bunched) > koleo_loss(spread) + 2.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_and_duplicates_are_finite_fp32(dtype):
    torch.manual_seed(3)
    x = torch.randn(8, 32)
    x[1] = x[0]  # a duplicated sample: distance ~ sqrt(D) * 1e-8, finite only in fp32
    loss = koleo_loss(x.to(dtype))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(koleo_loss(x.to(dtype).float()).item())
    xg = x.to(dtype).requires_grad_()
    koleo_loss(xg).backward()
    assert torch.isfinite(xg.grad).all()


def test_autocast_does_not_change_the_result():
    torch.manual_seed(4)
    x = torch.randn(12, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = koleo_loss(x)
    assert loss.dtype == torch.float32
    assert loss.item() == koleo_loss(x).item()


def test_batch_of_one_is_zero_with_a_graph():
    x = torch.randn(1, 4, requires_grad=True)
    loss = koleo_loss(x)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(x.grad, torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        koleo_loss(torch.randn(4))


def test_single_process_module_equals_function():
    x = torch.randn(10, 6)
    assert KoLeoLoss()(x).item() == koleo_loss(x).item()
    assert KoLeoLoss(group_size=4)(x).item() == koleo_loss(x).item()
    with pytest.raises(ValueError, match="group_size"):
        KoLeoLoss(group_size=0)


def _distributed_koleo(rank, world_size, full):
    b = full.shape[0] // world_size
    results = {}
    for group_size in (None, 1):
        local = full[rank * b:(rank + 1) * b].clone().requires_grad_()
        loss = KoLeoLoss(group_size=group_size)(local)
        loss.backward()
        results[group_size] = (loss.detach(), local.grad)
    return results


def test_two_process_koleo_equals_single_process_on_gathered_batch():
    torch.manual_seed(5)
    full = torch.randn(12, 4)
    results = run_distributed(_distributed_koleo, world_size=2, args=(full,))
    ref = full.clone().requires_grad_()
    ref_loss = koleo_loss(ref)
    ref_loss.backward()
    mean_loss = sum(r[None][0] for r in results) / 2
    assert mean_loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    # Each rank's gradient sums both ranks' losses; DDP then divides by the world size.
    grads = torch.cat([r[None][1] for r in results]) / 2
    assert torch.allclose(grads, ref.grad, atol=1e-6)
    # group_size=1: each rank alone, like DINOv2
    for rank, r in enumerate(results):
        assert r[1][0].item() == pytest.approx(koleo_loss(full[rank * 6:(rank + 1) * 6]).item(), rel=1e-6)
    # and the groups really differ here (neighbours found on the other rank)
    assert abs(sum(r[1][0] for r in results).item() / 2 - ref_loss.item()) > 1e-3
