"""The DINOv3 recipes: their numbers against REFERENCE.md and the official configs; the tiny one trains."""
import math

import pytest
import torch

from dinolite.data import SyntheticShapes
from dinolite.models import VisionTransformer
from dinolite.train import DINOv2MetaArch, get_config, train_step
from dinolite.train.data import StepBatches
from dinolite.train.meta_arch import build_student
from dinolite.train.optim import build_optimizer, schedule_values

from tests.test_train import micro_config


def meta_student(cfg):
    with torch.device("meta"):
        return build_student(cfg)


def test_vit7b_pretrain_matches_reference():
    cfg = get_config("dinov3-vit7b16-pretrain")
    student = meta_student(cfg)
    backbone = student.backbone
    assert isinstance(backbone, VisionTransformer)
    # Vision Transformer table: ViT-7B/16, 4096 dim, 40 blocks, 32 heads, SwiGLU hidden 8192, 6716 M parameters.
    assert (backbone.patch_size, backbone.embed_dim, len(backbone.blocks), backbone.num_heads) == (16, 4096, 40, 32)
    assert backbone.ffn_hidden == 8192
    assert round(sum(p.numel() for p in backbone.parameters()) / 1e6) == 6716
    assert backbone.blocks[0].attn.qkv.bias is None  # 7B: no qkv bias
    assert backbone.num_register_tokens == 4 and backbone.rope_embed is not None and backbone.pos_embed is None
    assert backbone.norm_eps == 1e-5 and backbone.local_cls_norm is not None
    assert backbone.blocks[0].drop_path == 0.4 and backbone.blocks[0].drop_path_mode == "subset"
    # DINO head 262144/512/8192, iBOT head 98304/384/4096, plain (not weight-normalised) last layers.
    for head, (k, bottleneck, hidden) in ((student.dino_head, (262144, 512, 8192)), (student.ibot_head, (98304, 384, 4096))):
        assert head.last_layer.weight.shape == (k, bottleneck) and isinstance(head.last_layer, torch.nn.Linear)
        assert head.mlp[0].weight.shape == (hidden, 4096)
    assert student.ibot_head is not student.dino_head
    c, lo, o, t = cfg.crops, cfg.loss, cfg.optim, cfg.train
    assert (c.global_size, c.local_size, c.n_local, c.flip_probability) == (256, 112, 8, 0.0)  # no flips
    assert (c.mask_ratio_mode, c.complete_masks) == ("upper", True)  # DINOv3 masking
    assert lo.centering == "sinkhorn_knopp" and (lo.dino_weight, lo.ibot_weight, lo.koleo_weight) == (1.0, 1.0, 0.1)
    # Teacher temperature 0.04 -> 0.07 over 100 x 1000 iterations; last layer frozen for 5 epochs.
    assert (lo.warmup_teacher_temp, lo.teacher_temp, lo.warmup_teacher_temp_epochs, t.epoch_length) == (0.04, 0.07, 100, 1000)
    assert o.freeze_last_layer_epochs == 5
    # 256 GPUs x 16 images = global batch 4096. DINOv3's "sqrt_wrt_1024" (dinov3_vit7b16_pretrain.yaml:118) is
    # 4 x sqrt(B / 1024) (dinov3/train/train.py:169-171), applied to peak 5e-5 and end 5e-5
    # (dinov3_vit7b16_pretrain.yaml:152-157): 5e-5 x 4 x 2 = 4e-4, constant after 100 warm-up epochs.
    assert (o.scaling_rule, o.lr_schedule) == ("sqrt_1024_x4", "constant")
    total = t.epochs * t.epoch_length
    values = [schedule_values(cfg, s, total, t.epoch_length, 256 * t.batch_size) for s in (100_000, 500_000, 999_999)]
    assert all(v.lr == pytest.approx(4e-4, rel=1e-12) for v in values)
    # the warm-up: numpy linspace(0, peak, 100000, endpoint=False) (cosine_lr_scheduler.py:77): step 50000 is half
    assert schedule_values(cfg, 0, total, 1000, 4096).lr == 0.0
    assert schedule_values(cfg, 50_000, total, 1000, 4096).lr == pytest.approx(2e-4, rel=1e-12)
    # constant at any batch: 64 images -> 5e-5 x 4 x sqrt(1 / 16) = 5e-5 at the first and last step after warm-up
    assert [schedule_values(cfg, s, total, 1000, 64).lr for s in (100_000, 999_999)] == pytest.approx([5e-5] * 2)
    assert values[0].momentum == pytest.approx(0.994) and values[-1].weight_decay == pytest.approx(0.04)


def test_vit7b_gram_stage_matches_reference():
    cfg = get_config("dinov3-vit7b16-gram")
    g, t = cfg.gram, cfg.train
    total = t.epochs * t.epoch_length
    at = lambda step: schedule_values(cfg, step, total, t.epoch_length, 4096)  # noqa: E731
    # dinov3_vit7b16_gram_anchor.yaml:64-69 (Gram: start 0, peak 0, end 2.0, warmup_epochs 1000, cosine_epochs 1)
    # and :25-31 (local DINO: start 1, peak 1, end 0.5, same epochs), through linear_warmup_cosine_decay
    # (cosine_lr_scheduler.py:78-83: cos(linspace(0, pi, 1000)), both ends included). At j = 333 and 666 of the
    # 1000-iteration cosine, cos(pi j / 999) = 0.5 and -0.5: Gram 2 x 0.25 = 0.5 and 1.5, local 0.875 and 0.625.
    assert at(999_999).gram_weight == 0.0 and at(999_999).local_dino_weight == 1.0
    assert [at(1_000_000 + j).gram_weight for j in (0, 333, 666, 999, 1000)] == pytest.approx([0, 0.5, 1.5, 2, 2])
    assert [at(1_000_000 + j).local_dino_weight for j in (0, 333, 666, 999)] == pytest.approx([1, 0.875, 0.625, 0.5])
    assert at(1_150_000).gram_weight == 2.0 and at(1_150_000).local_dino_weight == 0.5
    # lr 3e-5 x 4 x sqrt(4096 / 1024) = 2.4e-4 (gram_anchor.yaml:147, 183-188) and momentum 0.999 (:199-203).
    assert at(1_100_000).lr == pytest.approx(2.4e-4, rel=1e-12) and at(1_100_000).momentum == pytest.approx(0.999)
    # Gram teacher (gram_anchor.yaml:53-56): refreshed after iteration it when (it + 1) >= 1.01M and
    # (it + 1) % 10k == 0, at most 3 times (dinov3/train/train.py:535-544): before steps 1.01M, 1.02M, 1.03M.
    assert (g.update_every, g.first_update, g.max_updates) == (10_000, 1_010_000, 3)
    from dinolite.gram_teacher import GramTeacher
    refresh = GramTeacher(torch.nn.Linear(1, 1), g.update_every, g.first_update, g.max_updates)
    candidates = (1_000_000, 1_009_999, 1_010_000, 1_015_000, 1_020_000, 1_030_000, 1_040_000)
    assert [s for s in candidates if refresh.maybe_refresh(s, torch.nn.Linear(1, 1))] == [1_010_000, 1_020_000,
                                                                                          1_030_000]
    assert g.teacher_scale * cfg.crops.global_size == 512 and g.img_level and g.remove_neg == "none"


def test_dinov3_tiny_cpu_has_the_dinov3_parts_and_trains():
    cfg = get_config("dinov3-tiny-cpu")
    m, h, c = cfg.model, cfg.head, cfg.crops
    assert (m.pos_embed, m.num_register_tokens, m.rope_rescale_coords, m.untie_local_cls_norm) == ("rope", 4, 2.0, True)
    assert not h.weight_norm_last_layer and not h.share_heads and cfg.loss.centering == "sinkhorn_knopp"
    assert (c.mask_ratio_mode, c.complete_masks, c.flip_probability) == ("upper", True, 0.0)
    # A few micro steps: the losses are finite and fall on a fixed batch.
    micro = micro_config(*[f"model.{k}={v}" for k, v in (("pos_embed", "rope"), ("num_register_tokens", 4),
                                                           ("rope_rescale_coords", 2.0), ("untie_local_cls_norm", True))],
                         "head.weight_norm_last_layer=false", "crops.mask_ratio_mode=upper", "crops.complete_masks=true")
    arch = DINOv2MetaArch(micro)
    assert arch.student.backbone.norm_eps == 1e-5 and arch.student.backbone.local_cls_norm is not None
    batch = StepBatches(SyntheticShapes(48, 32), micro, total_steps=10)[0]
    # Upper-edge ratios filled exactly: the masked crops hold int(N * r_{i+1}) patches each.
    n_masked = sorted(int(x) for x in batch["masks"].sum(1) if x > 0)
    assert n_masked == sorted(int(16 * r) for r in torch.linspace(0.1, 0.5, 9)[1:].tolist())
    optimizer = build_optimizer(arch.student, micro)
    values = schedule_values(micro, 3, 6, 3, 8)
    losses = [train_step(arch, optimizer, batch, 3, values)["loss"].item() for _ in range(4)]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_gram_recipe_without_teacher_is_a_clear_error():
    with pytest.raises(ValueError, match="gram.teacher=RUN_DIR"):
        DINOv2MetaArch(micro_config("gram.weight=1.0"))
