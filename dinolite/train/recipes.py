"""The named recipes: one function per recipe, each returning a fresh Config. Hold this file against the official
configs (facebookresearch/dinov2 and dinov3 ssl_default_config.yaml and the train/*.yaml recipes).

    cfg = get_config("tiny-cpu")         # a recipe name (see RECIPES)
    cfg = get_config("my_run.yaml")      # or a YAML file
"""
import dataclasses
import difflib
import os

from dinolite.train.config import (
    Config,
    CropConfig,
    GramConfig,
    HeadConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    load_config,
)


def _tiny_cpu() -> Config:
    """A 3-block ViT of width 96 on 32 px crops (e.g. of the built-in SyntheticTextures): minutes on a CPU.

    Deviations from DINOv2, for a run of a few hundred steps: no LayerScale (with gammas at 1e-5
    every image gives almost the same [CLS] feature for the first thousands of steps), no drop
    path, K = 128 prototypes in one shared head, a higher base lr, teacher momentum 0.99 -> 0.999,
    a sharper teacher (temperature 0.02 throughout instead of 0.04 -> 0.07: early on the crops of
    one image agree little, and with a softer teacher the targets drift to uniform), the blur
    sigma scaled to the crop size (DINOv2's 0.1-2 px is meant for 224 px crops; 2 px on a 32 px
    crop wipes out a pattern with a 6 px period), and fp32 (bf16 matmuls are emulated, slower
    than fp32, on CPUs without AVX512-BF16/AMX).
    """
    return Config(
        model=ModelConfig(img_size=32, patch_size=8, embed_dim=96, depth=3, num_heads=3,
                          drop_path_rate=0.0, layerscale_init=0.0),
        head=HeadConfig(dino_out_dim=128, ibot_out_dim=128, hidden_dim=256, bottleneck_dim=64, share_heads=True),
        loss=LossConfig(teacher_temp=0.02, warmup_teacher_temp=0.02, warmup_teacher_temp_epochs=0),
        crops=CropConfig(global_size=32, local_size=16, n_local=2, global_scale_min=0.4,
                         local_scale_min=0.1, local_scale_max=0.4,
                         blur_sigma_min=round(0.1 * 32 / 224, 4), blur_sigma_max=round(2.0 * 32 / 224, 4)),
        optim=OptimConfig(base_lr=0.03, warmup_epochs=1, momentum_teacher=0.99, final_momentum_teacher=0.999,
                          freeze_last_layer_epochs=0.5),
        train=TrainConfig(batch_size=32, epochs=8, epoch_length=25, precision="fp32",
                          num_workers=1, checkpoint_every=50, log_every=5, monitor_every=25,
                          knn_every=50, knn_train_size=1000, knn_test_size=500),
    )


def _small_photos() -> Config:
    """tiny-cpu for real photographs on a CPU budget: the same network, objective and crops, with a tenth of
    tiny-cpu's base lr (0.003: a peak of 5.3e-4 at batch 32 after the square-root rule, instead of 5.3e-3).

    Found on Imagenette at 32 px and confirmed on Imagewoof and at 64 px (benchmarks/ablate_photos.py; tables
    and curves in benchmarks/README.md "Real photographs"): 5,016 steps of batch 32, one thread, the teacher's
    weighted kNN (k 20) on the held-out split, 3 seeds (mean, and the range over seeds), against Lightly 1.6's
    DINO on the same backbone, crops, images and steps:

        set (32 px)   side               kNN init -> end   gain (min..max)        CPU s/step
        Imagenette    small-photos        28.1 -> 40.3      +12.2 (+11.2..+12.8)     0.142
        Imagenette    Lightly 1.6 DINO    29.2 -> 30.0       +0.9 (+0.7..+1.1)     0.147
        Imagewoof     small-photos        16.3 -> 22.6       +6.3 (+5.8..+7.1)     0.141
        Imagewoof     Lightly 1.6 DINO    16.5 -> 18.5       +2.0 (+0.6..+2.9)     0.146
        raw pixels: Imagenette 36.6, Imagewoof 23.2; chance 10.0

    At 64 px (the same recipe and network on crops of 2 x 64 + 2 x 32 px, ablate_photos --size tiny-cpu-64):

        Imagenette    small-photos        29.4 -> 45.8      +16.4 (+15.5..+17.1)     0.340
        Imagenette    Lightly 1.6 DINO    29.8 -> 33.0       +3.3 (+2.5..+3.8)     0.337
        raw pixels 35.0; chance 10.0

    With tiny-cpu's lr (0.03) the kNN on photos stalls, and dips, while the lr is high and climbs only as the
    cosine decay brings it down (Imagenette, seed 0: +9.55 against +11.18 for 0.003; base lr 0.001: +10.34).
    On issue 21's held-aside 32-px set tiny-cpu gained +2.95, and base lr 0.01 with the slower teacher and KoLeo
    0.5 this recipe used to add -0.25. The rest of the DINOv2 objective stays: iBOT
    with masks, KoLeo 0.1, Sinkhorn-Knopp, and tiny-cpu's other deviations (no LayerScale, no drop path,
    K = 128 in one shared head, teacher temperature 0.02, blur scaled to the crop; see _tiny_cpu). K = 4096
    added +0.4 points on one seed for 15% more time per step, and is not used. train.precision is auto: bf16
    on a GPU, and on a CPU where a probe finds bf16 faster at the run's width (fp32 at width 96).
    """
    cfg = _tiny_cpu()
    cfg.optim = dataclasses.replace(cfg.optim, base_lr=0.003)
    cfg.train = dataclasses.replace(cfg.train, precision="auto")
    return cfg


def _vits16_imagenette_1gpu() -> Config:
    """ViT-S/16 on Imagenette (9.5k images) on one GPU: a realistic single-GPU run."""
    return Config(
        model=ModelConfig(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6,
                          drop_path_rate=0.1),
        head=HeadConfig(dino_out_dim=16384, ibot_out_dim=16384, share_heads=True),
        loss=LossConfig(warmup_teacher_temp_epochs=30),
        crops=CropConfig(global_size=224, local_size=96, n_local=8),
        optim=OptimConfig(base_lr=0.004, warmup_epochs=10, momentum_teacher=0.996),
        train=TrainConfig(batch_size=64, epochs=100, epoch_length=0, num_workers=8,
                          checkpoint_every=1000, knn_every=5000),
    )


def _vitb14_imagenet() -> Config:
    """DINOv2 ViT-B/14 recipe on ImageNet-1k (global batch 1024 = e.g. 8 GPUs x 128)."""
    return Config(
        model=ModelConfig(img_size=224, patch_size=14, embed_dim=768, depth=12, num_heads=12,
                          drop_path_rate=0.3),
        head=HeadConfig(dino_out_dim=65536, ibot_out_dim=65536, share_heads=True),
        train=TrainConfig(batch_size=128, epochs=100, epoch_length=1250),
    )


def _dinov3_tiny_cpu() -> Config:
    """tiny-cpu with everything DINOv3 trains with: RoPE (no position table) with its rescale augmentation,
    4 storage tokens, LayerNorm eps 1e-5, an untied local-CLS norm, separate DINO and iBOT heads with plain
    (not weight-normalised) prototype layers, Sinkhorn-Knopp centering, DINOv3 masking (bin upper edges,
    filled to the exact ratio), subset stochastic depth and no flips. tiny-cpu's deviations for a run of a
    few hundred CPU steps (no LayerScale, K = 128, sharp teacher, high lr, fp32) are kept, and so is DINOv2's lr rule
    (optim.scaling_rule=sqrt_1024 with base_lr 0.03: the same peak as 0.0075 under DINOv3's sqrt_1024_x4)."""
    cfg = _tiny_cpu()
    cfg.model = dataclasses.replace(cfg.model, pos_embed="rope", num_register_tokens=4, rope_rescale_coords=2.0,
                                    untie_local_cls_norm=True, mask_k_bias=True)
    cfg.head = dataclasses.replace(cfg.head, share_heads=False, weight_norm_last_layer=False)
    cfg.crops = dataclasses.replace(cfg.crops, mask_ratio_mode="upper", complete_masks=True, flip_probability=0.0)
    return cfg


def _dinov3_tiny_cpu_gram() -> Config:
    """The Gram-anchoring stage of dinov3-tiny-cpu, meant to continue a finished dinov3-tiny-cpu run
    (--continue-from RUN): 4 more epochs with the Gram loss from epoch 8, ramped to 1.0 over a fifth of an
    epoch, a 2x high-resolution Gram teacher, the local-crop DINO weight at 0.5 and a slower teacher, as the
    7B refinement does (2.0, 512 px teacher, 0.5, momentum 0.999). Set gram.teacher (and gram.teacher_step)."""
    cfg = _dinov3_tiny_cpu()
    cfg.train = dataclasses.replace(cfg.train, epochs=12)
    cfg.optim = dataclasses.replace(cfg.optim, momentum_teacher=0.999, final_momentum_teacher=0.999)
    cfg.gram = GramConfig(weight=1.0, start_epoch=8, warmup_epochs=0.2, teacher_scale=2.0, local_dino_weight=0.5)
    return cfg


def _dinov3_vit7b16_pretrain() -> Config:
    """The DINOv3 ViT-7B/16 pre-training config (official values; 256 GPUs x 16 images, not for one machine).

    lr (dinov3_vit7b16_pretrain.yaml:118, 151-157; dinov3/train/train.py:169-187): 0 -> 5e-5 x 4 sqrt(global
    batch / 1024) over 100 epochs, then constant (optim.lr_schedule=constant): 4e-4 at the official batch of 4096.
    Distributed settings (scale.config.RECIPE_DIST): compile, selective activation checkpointing.

    Deviation: the official 7B configs run the blocks' matmuls in FP8 row-wise (fp8_enabled: true, fp8_filter:
    blocks, pretrain yaml:89-90; torchao float8 training). dinolite computes them in bf16. Expected cost: the
    blocks' matmuls (most of a 7B step's FLOPs) run at the bf16 rate, up to 2x slower than FP8 on H100 (its dense
    FP8 peak is twice the bf16 one; the end-to-end gain is smaller, not measured here), and the numerics differ
    by FP8 rounding (not measured). torchao
    0.18.0 imports with torch 2.14.1 and emulates row-wise float8 training on CPU (checked), so an optional
    dist.fp8 could be tested here once torchao is added to the environment.
    """
    return Config(
        model=ModelConfig(img_size=256, patch_size=16, embed_dim=4096, depth=40, num_heads=32, ffn="swiglu64",
                          ffn_ratio=3.0, num_register_tokens=4, pos_embed="rope", layerscale_init=1e-5,
                          drop_path_rate=0.4, drop_path_mode="subset", norm_eps=1e-5, qkv_bias=False,
                          mask_k_bias=True, untie_local_cls_norm=True, rope_rescale_coords=2.0),
        head=HeadConfig(dino_out_dim=262144, hidden_dim=8192, bottleneck_dim=512, ibot_out_dim=98304,
                        ibot_hidden_dim=4096, ibot_bottleneck_dim=384, share_heads=False,
                        weight_norm_last_layer=False),
        loss=LossConfig(centering="sinkhorn_knopp", teacher_temp=0.07, warmup_teacher_temp=0.04,
                        warmup_teacher_temp_epochs=100),
        crops=CropConfig(global_size=256, local_size=112, n_local=8, mask_ratio_mode="upper", complete_masks=True,
                         flip_probability=0.0),
        optim=OptimConfig(base_lr=5e-5, warmup_epochs=100, weight_decay=0.04, weight_decay_end=0.04,
                          momentum_teacher=0.994, final_momentum_teacher=0.994, clip_grad=30.0,
                          layerwise_decay=0.98, patch_embed_lr_mult=0.2, freeze_last_layer_epochs=5,
                          adamw_beta2=0.99, scaling_rule="sqrt_1024_x4", lr_schedule="constant"),
        train=TrainConfig(batch_size=16, epochs=1000, epoch_length=1000, precision="bf16", num_workers=10,
                          checkpoint_every=1000, keep_last=3),
    )


def _dinov3_vit7b16_gram() -> Config:
    """The DINOv3 ViT-7B/16 Gram-anchoring stage: continues the pre-training run from iteration 1M to 1.2M.

    Official: Gram loss weight 0 until epoch 1000, then to 2.0 over one epoch (a cosine ramp; ours is linear),
    the local-crop DINO weight 1 -> 0.5 (ours switches at epoch 1000), Gram teacher crops 512 px (2x), refreshed
    from the EMA teacher every 10k iterations from 1.01M, at most 3 times; lr 3e-5 x 4 sqrt(global batch / 1024),
    constant (2.4e-4 at batch 4096; dinov3_vit7b16_gram_anchor.yaml:147, 183-188), teacher momentum 0.999.
    Set gram.teacher to the chosen early checkpoint.
    """
    cfg = _dinov3_vit7b16_pretrain()
    cfg.train = dataclasses.replace(cfg.train, epochs=1200)
    cfg.optim = dataclasses.replace(cfg.optim, base_lr=3e-5, momentum_teacher=0.999, final_momentum_teacher=0.999)
    cfg.gram = GramConfig(weight=2.0, start_epoch=1000, warmup_epochs=1, local_dino_weight=0.5, teacher_scale=2.0,
                          update_every=10_000, first_update=1_010_000, max_updates=3, img_level=True,
                          remove_neg="none")
    return cfg


def _tiny_cpu_distill() -> Config:
    """Distil a trained teacher (teacher.checkpoint=..., e.g. the reference teacher book/weights/textures_p8_teacher.pth:
    tiny-cpu at width 128 with 6 blocks, trained 500 steps on textures) into a tiny-cpu student of width 64 with 3
    blocks (about a twelfth of the teacher's block compute). DINOv3 distillation: the teacher's targets are
    Sinkhorn-Knopp centred at temperature 0.07 (no warm-up: the teacher is trained); the student's heads have the
    teacher's prototype counts. Add students that share each teacher pass with teacher.students="small:embed_dim=32"."""
    cfg = _tiny_cpu()
    cfg.model = dataclasses.replace(cfg.model, embed_dim=64, depth=3, num_heads=2)
    cfg.loss = dataclasses.replace(cfg.loss, teacher_temp=0.07, warmup_teacher_temp=0.07, warmup_teacher_temp_epochs=0)
    cfg.train = dataclasses.replace(cfg.train, epochs=4, epoch_length=50, knn_every=0)
    return cfg


def _dinov3_tiny_cpu_highres() -> Config:
    """High-resolution adaptation of a dinov3-tiny-cpu run (continue it with --continue-from RUN and set gram.teacher):
    each step trains at (global, local) 32/16 or 48/24 px with equal probability, the same on every rank, with a Gram
    teacher at 1.5x the global size, a constant Gram weight 1.5 and local-crop DINO weight 0.5 (the 7B's values,
    scaled down in pixels). 2 more epochs after dinov3-tiny-cpu's 8."""
    cfg = _dinov3_tiny_cpu()
    cfg.crops = dataclasses.replace(cfg.crops, size_pairs="32:16:0.5,48:24:0.5")
    cfg.train = dataclasses.replace(cfg.train, epochs=10)
    cfg.optim = dataclasses.replace(cfg.optim, momentum_teacher=0.999, final_momentum_teacher=0.999)
    cfg.gram = GramConfig(weight=1.5, start_epoch=0, warmup_epochs=0, teacher_scale=1.5, local_dino_weight=0.5)
    return cfg


def _dinov3_vit7b16_highres() -> Config:
    """The DINOv3 ViT-7B/16 high-resolution adaptation (dinov3_vit7b16_high_res_adapt.yaml): a FRESH 30-epoch run
    (iteration 0, fresh AdamW) from the Gram stage's weights: start it with --init-from GRAM_RUN (weights only) and
    set gram.teacher. Official values (yaml line numbers):
    - each step, the same on every rank, one global:local pair with probability (:162-179): 512:112 (0.3),
      768:112 (0.3), 768:168 (0.3), 768:224 (0.05), 768:336 (0.05); Gram-teacher crops 768 at 512 and 1152 at
      768 (:180-185), i.e. teacher_scale 1.5. Deviation: 168 px is not a multiple of the 16 px patch; the official
      patch embedding (stride-16 conv, its multiple-of-patch assert commented out, dinov3/layers/patch_embed.py:67)
      drops the last 8 px, giving 10 x 10 tokens; we take 160 px locals (the same 10 x 10 tokens).
    - 8 images per GPU (:70); KoLeo over groups of 16 samples of the global batch (:19-22): with scale/train.py
      dist.koleo_group_size=2 (that key counts ranks: 2 ranks x 8 images = 16 samples).
    - lr (:146, :203-209): a cosine from 0 up to 1.25e-5 x 4 sqrt(global batch / 1024) over 10 epochs, then
      flat (optim.lr_schedule=cosine_rise); last layer never frozen; weight decay 0.04; momentum 0.999 (:220-224).
    - Gram weight 1.5 constant (:63-68), never refreshed (rep_update false, :52); local-crop DINO weight 0.5
      (:24-30); teacher temperature 0.07 constant (:215-219).
    """
    cfg = _dinov3_vit7b16_gram()
    cfg.train = dataclasses.replace(cfg.train, epochs=30, batch_size=8, checkpoint_every=250)
    cfg.crops = dataclasses.replace(cfg.crops, size_pairs="512:112:0.3,768:112:0.3,768:160:0.3,768:224:0.05,"
                                                          "768:336:0.05")
    cfg.loss = dataclasses.replace(cfg.loss, teacher_temp=0.07, warmup_teacher_temp=0.07, warmup_teacher_temp_epochs=0)
    cfg.optim = dataclasses.replace(cfg.optim, base_lr=1.25e-5, lr_schedule="cosine_rise", warmup_epochs=10,
                                    freeze_last_layer_epochs=0)
    cfg.gram = dataclasses.replace(cfg.gram, weight=1.5, start_epoch=0, warmup_epochs=0, final_weight=-1.0,
                                   teacher_scale=1.5, local_dino_weight=0.5, update_every=0, first_update=0,
                                   max_updates=0)
    return cfg


def _vitg14_lvd142m() -> Config:
    """The DINOv2 ViT-g/14 pre-training recipe on LVD-142M (official values, REFERENCE.md "Training recipe").

    ViT-g/14: 1536 dim, 40 blocks, 24 heads, SwiGLU (hidden 4096), LayerScale 1e-5, drop path 0.4 by batch subset;
    separate DINO and iBOT heads of 131072 prototypes (bottleneck 384, weight-normalised last layer);
    Sinkhorn-Knopp centering; lr 2e-4 x sqrt(global batch / 1024) after 80 warm-up epochs of 1250 iterations,
    weight decay 0.04 -> 0.2, teacher momentum 0.994 -> 1, layer-wise decay 1.0. train.batch_size is per GPU
    (choose it with python -m scale.plan); train with scale/train.py (FSDP2), not on one process.
    """
    return Config(
        model=ModelConfig(img_size=224, patch_size=14, embed_dim=1536, depth=40, num_heads=24, ffn="swiglu",
                          ffn_ratio=4.0, layerscale_init=1e-5, drop_path_rate=0.4, drop_path_mode="subset",
                          norm_eps=1e-6),
        head=HeadConfig(dino_out_dim=131072, ibot_out_dim=131072, hidden_dim=2048, bottleneck_dim=384,
                        share_heads=False, weight_norm_last_layer=True),
        loss=LossConfig(centering="sinkhorn_knopp", teacher_temp=0.07, warmup_teacher_temp=0.04,
                        warmup_teacher_temp_epochs=30),
        crops=CropConfig(global_size=224, local_size=98, n_local=8),
        optim=OptimConfig(base_lr=2e-4, min_lr=1e-6, warmup_epochs=80, weight_decay=0.04, weight_decay_end=0.2,
                          momentum_teacher=0.994, final_momentum_teacher=1.0, clip_grad=3.0, layerwise_decay=1.0,
                          patch_embed_lr_mult=0.2, freeze_last_layer_epochs=1),
        train=TrainConfig(batch_size=12, epochs=500, epoch_length=1250, precision="bf16", num_workers=10,
                          checkpoint_every=1000, keep_last=3),
    )


RECIPES = {
    "tiny-cpu": _tiny_cpu,
    "small-photos": _small_photos,
    "dinov3-tiny-cpu": _dinov3_tiny_cpu,
    "dinov3-tiny-cpu-gram": _dinov3_tiny_cpu_gram,
    "dinov3-vit7b16-pretrain": _dinov3_vit7b16_pretrain,
    "dinov3-vit7b16-gram": _dinov3_vit7b16_gram,
    "dinov3-vit7b16-highres": _dinov3_vit7b16_highres,
    "tiny-cpu-distill": _tiny_cpu_distill,
    "dinov3-tiny-cpu-highres": _dinov3_tiny_cpu_highres,
    "vitg14-lvd142m": _vitg14_lvd142m,
    "vits16-imagenette-1gpu": _vits16_imagenette_1gpu,
    "vitb14-imagenet": _vitb14_imagenet,
}


def get_config(name_or_path: str) -> Config:
    """A named recipe (one of RECIPES) or a YAML file path."""
    if name_or_path in RECIPES:
        return RECIPES[name_or_path]()
    if os.path.isfile(name_or_path):
        return load_config(name_or_path)
    close = difflib.get_close_matches(name_or_path, list(RECIPES), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown config {name_or_path!r}: not a recipe name and not a file.{hint} "
                     f"Recipes: {', '.join(RECIPES)}")
