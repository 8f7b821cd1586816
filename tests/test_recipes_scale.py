"""The ViT-g/14 LVD-142M recipe (scale/) against REFERENCE.md: architecture, heads and training recipe."""
import pytest
import torch

from dinolite.models import VisionTransformer
from dinolite.train import get_config
from dinolite.train.meta_arch import build_backbone, build_student
from dinolite.train.optim import build_param_groups, schedule_values


def test_vitg14_lvd142m_matches_reference():
    cfg = get_config("vitg14-lvd142m")
    with torch.device("meta"):
        student = build_student(cfg)
        cfg.model.img_size = 518  # the table counts the position embedding of the released 518 px models
        backbone_518 = build_backbone(cfg)
        cfg.model.img_size = 224
    backbone = student.backbone
    assert isinstance(backbone, VisionTransformer)
    # Vision Transformer table: ViT-g/14, 1536 dim, 40 blocks, 24 heads, SwiGLU hidden 4096, 1136.48 M parameters.
    assert (backbone.patch_size, backbone.embed_dim, len(backbone.blocks), backbone.num_heads) == (14, 1536, 40, 24)
    assert backbone.ffn_hidden == 4096 and backbone.blocks[0].mlp.w12.weight.shape == (2 * 4096, 1536)
    assert round(sum(p.numel() for p in backbone_518.parameters()) / 1e4) / 100 == 1136.48
    assert backbone.norm_eps == 1e-6 and backbone.pos_embed is not None and backbone.num_register_tokens == 0
    assert backbone.blocks[0].drop_path == 0.4 and backbone.blocks[0].drop_path_mode == "subset"  # L/g: 0.4
    assert backbone.blocks[0].ls1.gamma.shape == (1536,) and cfg.model.layerscale_init == 1e-5
    # DINO head: Linear(D, 2048)-GELU-Linear(2048, 2048)-GELU-Linear(2048, bottleneck); L/g: K 131072, bottleneck 384,
    # untied iBOT head; DINOv2: weight-normalised last layer.
    assert student.ibot_head is not student.dino_head
    for head in (student.dino_head, student.ibot_head):
        assert head.mlp[0].weight.shape == (2048, 1536) and head.mlp[2].weight.shape == (2048, 2048)
        assert head.mlp[4].weight.shape == (384, 2048) and head.last_layer.weight_v.shape == (131072, 384)
    c, lo, o, t = cfg.crops, cfg.loss, cfg.optim, cfg.train
    assert (c.global_size, c.local_size, c.n_local, c.global_scale_min, c.local_scale_min, c.local_scale_max) \
        == (224, 98, 8, 0.32, 0.05, 0.32)
    assert (c.mask_probability, c.mask_ratio_min, c.mask_ratio_max, c.mask_ratio_mode) == (0.5, 0.1, 0.5, "uniform")
    assert lo.centering == "sinkhorn_knopp" and (lo.dino_weight, lo.ibot_weight, lo.koleo_weight) == (1.0, 1.0, 0.1)
    assert (lo.student_temp, lo.warmup_teacher_temp, lo.teacher_temp, lo.warmup_teacher_temp_epochs) \
        == (0.1, 0.04, 0.07, 30)
    assert t.epoch_length == 1250 and o.freeze_last_layer_epochs == 1
    assert (o.adamw_beta1, o.adamw_beta2, o.clip_grad, o.patch_embed_lr_mult) == (0.9, 0.999, 3.0, 0.2)
    # Layer-wise decay 1.0 for L/g: every backbone group but patch_embed (x 0.2) has lr multiplier 1.
    groups = build_param_groups(student, cfg.model.depth, o.layerwise_decay, o.patch_embed_lr_mult)
    assert sorted({round(g["lr_mult"], 9) for g in groups}) == [0.2, 1.0]
    # lr 2e-4 x sqrt(B / 1024), 80 warm-up epochs, cosine to 1e-6; wd 0.04 -> 0.2; momentum 0.994 -> 1.
    total, batch = t.epochs * t.epoch_length, 3072
    at = lambda step: schedule_values(cfg, step, total, t.epoch_length, batch)  # noqa: E731
    assert at(80 * 1250).lr == pytest.approx(2e-4 * (batch / 1024) ** 0.5, rel=1e-4)
    assert at(40 * 1250).lr == pytest.approx(1e-4 * (batch / 1024) ** 0.5, rel=1e-3)
    assert at(total - 1).lr == pytest.approx(1e-6, rel=1e-2)
    assert at(0).weight_decay == pytest.approx(0.04) and at(total - 1).weight_decay == pytest.approx(0.2, rel=1e-4)
    assert at(0).momentum == pytest.approx(0.994) and at(total - 1).momentum == pytest.approx(1.0, abs=1e-6)
    assert at(0).teacher_temp == pytest.approx(0.04) and at(30 * 1250).teacher_temp == pytest.approx(0.07)
