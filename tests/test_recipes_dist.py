"""Each official recipe carries its distributed settings (scale.config.RECIPE_DIST), the planner plans with them, and
KoLeo groups can be given in samples, the official unit."""
import pytest

from scale import plan as P
from scale.config import DistConfig, load_scale_config
from scale.parallelize import koleo_group_ranks


def test_the_7b_recipes_carry_the_official_dist_settings():
    # dinov3_vit7b16_pretrain.yaml:54-56: checkpointing true, checkpointing_full false, compile true
    _, pretrain = load_scale_config("dinov3-vit7b16-pretrain")
    assert (pretrain.compile, pretrain.activation_checkpointing, pretrain.reshard_after_forward) == (True, "selective",
                                                                                                     True)
    # dinov3_vit7b16_gram_anchor.yaml:83-85 and high_res_adapt.yaml:82-84: full checkpointing, compile
    _, gram = load_scale_config("dinov3-vit7b16-gram")
    assert (gram.compile, gram.activation_checkpointing) == (True, "full")
    # high_res_adapt.yaml:19-22: distributed KoLeo, koleo_distributed_loss_group_size 16 (samples)
    _, highres = load_scale_config("dinov3-vit7b16-highres")
    assert (highres.compile, highres.activation_checkpointing, highres.koleo_group_samples) == (True, "full", 16)
    # an override wins; other recipes keep the plain defaults
    assert load_scale_config("dinov3-vit7b16-gram", ["dist.compile=false"])[1].compile is False
    assert load_scale_config("tiny-cpu")[1] == DistConfig()


def test_the_planner_plans_with_the_recipes_activation_checkpointing(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(P, "plan", lambda cfg, gpus, gpu, batch, ac, *a, **k: seen.append(ac) or {})
    monkeypatch.setattr(P, "format_plan", lambda result, name: "")
    for name in ("dinov3-vit7b16-pretrain", "dinov3-vit7b16-gram"):
        assert P.main(["--config", name, "--gpus", "256", "--gpu", "h100", "--batch-per-gpu", "16"]) == 0
    assert seen == ["selective", "full"]


def test_koleo_groups_in_samples_as_officially():
    # koleo_loss.py:84-100: groups of loss_group_size samples; it must be a multiple of the local batch and divide
    # the global batch. 16 samples of 8 per rank: 2 ranks a group.
    d = DistConfig(koleo_group_samples=16)
    assert koleo_group_ranks(d, 8, 4) == 2 and koleo_group_ranks(d, 8, 2) is None  # 2 ranks = all of them
    assert koleo_group_ranks(d, 16, 4) == 1
    with pytest.raises(ValueError, match="does not divide"):
        koleo_group_ranks(d, 8, 3)
    assert koleo_group_ranks(DistConfig(koleo_group_size=0), 8, 4) is None  # the old key still works
    with pytest.raises(ValueError, match="multiple of train.batch_size=8"):
        load_scale_config("dinov3-vit7b16-highres", ["dist.koleo_group_samples=12"])


def _with_and_without_prefetch(rank, world):
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from dinolite.models import VisionTransformer
    from scale.parallelize import shard_backbone

    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world,))
    results = []
    for prefetch in (True, False):
        torch.manual_seed(0)
        backbone = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2)
        shard_backbone(backbone, mesh, MixedPrecisionPolicy(), reshard_after_forward=True, prefetch=prefetch)
        chained = [len(b._get_fsdp_state()._states_to_forward_prefetch) for b in backbone.blocks]
        torch.manual_seed(1 + rank)
        out = backbone.forward_features(torch.randn(2, 3, 32, 32))["x_norm_clstoken"]
        out.square().sum().backward()
        grads = {k: p.grad.full_tensor() for k, p in backbone.named_parameters() if p.grad is not None}
        results.append((chained, out.detach(), grads))
    return results


def test_the_fsdp2_prefetch_chain_leaves_the_results_unchanged():
    """dinov3/fsdp/ac_compile_parallelize.py:118-121: block i prefetches block i + 1 in forward (and i - 1 in
    backward); on gloo the outputs and gradients are identical bit for bit with and without the chain."""
    import torch

    from tests.distributed_utils import run_distributed

    for (chained, out, grads), (unchained, out0, grads0) in run_distributed(_with_and_without_prefetch, 2):
        assert chained == [1, 1, 0] and unchained == [0, 0, 0]
        assert torch.equal(out, out0) and grads.keys() == grads0.keys()
        assert all(torch.equal(grads[k], grads0[k]) for k in grads)
