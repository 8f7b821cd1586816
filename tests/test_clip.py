"""Per-module gradient clipping, as the official trainers clip: one clip_grad_norm_ per student module
(DINOv2 dinov2/train/train.py:250-259 `for v in model.student.values(): v.clip_grad_norm_(cfg.optim.clip_grad)`;
DINOv3 dinov3/train/train.py:488-497, logging `f"{k}_grad_norm"` for k in backbone, dino_head, ibot_head)."""
import math

import pytest
import torch
from torch import nn

from dinolite.train.optim import clip_grad_norm_per_module_, student_modules, total_grad_norm
from tests.distributed_utils import run_distributed


def modules_with_grad_norms(norms) -> dict[str, nn.Module]:
    """Three small modules whose gradients have exactly the given L2 norms (a 3-4-0 / 0-3-4 pattern, scaled)."""
    modules = {}
    for name, norm in zip(("backbone", "dino_head", "ibot_head"), norms):
        module = nn.Linear(2, 1)  # weight [1, 2], bias [1]
        module.weight.grad = torch.tensor([[3.0, 0.0]]) * (norm / 5.0)
        module.bias.grad = torch.tensor([4.0]) * (norm / 5.0)
        modules[name] = module
    return modules


def grad_norm(module: nn.Module) -> float:
    return math.sqrt(sum(p.grad.double().square().sum().item() for p in module.parameters()))


def test_the_issue_example_40_10_5_with_clip_30_gives_30_10_5():
    modules = modules_with_grad_norms((40.0, 10.0, 5.0))
    before = clip_grad_norm_per_module_(modules, 30.0)
    assert [b.item() for b in before.values()] == pytest.approx([40.0, 10.0, 5.0], rel=1e-6)
    after = [grad_norm(m) for m in modules.values()]
    assert after == pytest.approx([30.0, 10.0, 5.0], rel=1e-5)  # a joint clip: 30/41.5 x each = (28.9, 7.2, 3.6)
    assert total_grad_norm(before).item() == pytest.approx(math.sqrt(40**2 + 10**2 + 5**2), rel=1e-6)


def test_a_clip_below_every_norm_brings_each_module_to_the_clip():
    modules = modules_with_grad_norms((7.0, 4.0, 2.5))
    clip_grad_norm_per_module_(modules, 1.5)
    assert [grad_norm(m) for m in modules.values()] == pytest.approx([1.5] * 3, rel=1e-5)


def test_a_module_under_the_clip_is_untouched_bit_for_bit():
    modules = modules_with_grad_norms((40.0, 2.0, 5.0))
    kept = [p.grad.clone() for p in modules["dino_head"].parameters()]
    clip_grad_norm_per_module_(modules, 3.0)
    assert all(torch.equal(p.grad, k) for p, k in zip(modules["dino_head"].parameters(), kept))
    assert grad_norm(modules["backbone"]) == pytest.approx(3.0, rel=1e-5)


def test_clip_zero_disables_clipping_but_still_reports_the_norms():
    modules = modules_with_grad_norms((40.0, 10.0, 5.0))
    norms = clip_grad_norm_per_module_(modules, 0.0)
    assert [n.item() for n in norms.values()] == pytest.approx([40.0, 10.0, 5.0], rel=1e-6)
    assert [grad_norm(m) for m in modules.values()] == pytest.approx([40.0, 10.0, 5.0], rel=1e-6)


def test_a_shared_ibot_head_is_one_module_as_in_dinov2():
    head = nn.Linear(2, 2)
    student = nn.ModuleDict(dict(backbone=nn.Linear(2, 2), dino_head=head, ibot_head=head))
    assert list(student_modules(student)) == ["backbone", "dino_head"]
    separate = nn.ModuleDict(dict(backbone=nn.Linear(2, 2), dino_head=nn.Linear(2, 2), ibot_head=nn.Linear(2, 2)))
    assert list(student_modules(separate)) == ["backbone", "dino_head", "ibot_head"]


def test_train_step_logs_each_module_norm_under_the_official_names():
    from dinolite.train import apply_overrides, get_config
    from dinolite.train.loop import LOGGED

    assert {"backbone_grad_norm", "dino_head_grad_norm", "ibot_head_grad_norm"} <= set(LOGGED)
    from scale.train import MODULE_NORMS
    assert MODULE_NORMS == ("backbone_grad_norm", "dino_head_grad_norm", "ibot_head_grad_norm")
    assert apply_overrides(get_config("tiny-cpu"), []).optim.clip_grad > 0


# ---------------------------------------------------------------------------------------
# FSDP2: 2 gloo processes == 1 process

def _three_modules():
    torch.manual_seed(0)
    return nn.ModuleDict(dict(backbone=nn.Linear(6, 5), dino_head=nn.Linear(5, 7), ibot_head=nn.Linear(5, 3)))


def _backward(modules, x):
    h = modules["backbone"](x)
    # weights 30, 1, 0.01: one module far over the clip, one near, one far under
    (30 * modules["dino_head"](h).square().sum() + modules["ibot_head"](h).square().sum() * 0.01).backward()


def _clip_on_shards(rank, world, max_norm):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from scale.train import clip_grad_norm_per_module_ as sharded_clip

    torch.set_num_threads(1)
    modules = _three_modules()
    mesh = init_device_mesh("cpu", (world,))
    for module in modules.values():  # 7, 5, 3 rows: uneven shards
        fully_shard(module, mesh=mesh)
    x = torch.linspace(-1, 1, 24).reshape(4, 6)  # the same batch on every rank: the gradient mean is its gradient
    _backward(modules, x)
    norms = sharded_clip(dict(modules.items()), max_norm)
    grads = {f"{m}.{n}": p.grad.full_tensor() for m, module in modules.items() for n, p in module.named_parameters()}
    return {k: v.item() for k, v in norms.items()}, grads


def test_two_processes_clip_each_module_like_one_process():
    max_norm = 3.0
    modules = _three_modules()
    _backward(modules, torch.linspace(-1, 1, 24).reshape(4, 6))
    expected_norms = {k: v.item() for k, v in clip_grad_norm_per_module_(dict(modules.items()), max_norm).items()}
    assert expected_norms["dino_head"] > max_norm > expected_norms["ibot_head"]  # the case is a real test
    expected = {f"{m}.{n}": p.grad for m, module in modules.items() for n, p in module.named_parameters()}
    for norms, grads in run_distributed(_clip_on_shards, world_size=2, args=(max_norm,)):
        assert norms.keys() == expected_norms.keys()
        for name, norm in norms.items():  # fp32 sums in another order: a few ulps
            assert norm == pytest.approx(expected_norms[name], rel=1e-5)
        for key, grad in grads.items():
            torch.testing.assert_close(grad, expected[key], rtol=1e-5, atol=1e-7)
