"""The DINOv2 meta-architecture: a student (backbone + DINO head + iBOT head) and its EMA teacher.

    teacher (EMA copy, no gradients, eval mode)          student (trained by AdamW)
    global crops [2B,3,G,G], unmasked                     global crops, masked  +  local crops
          |                                                      | forward_features_list: one pass (GPU) or one per crop size (CPU)
    CLS [2B,D] -> DINO head -> SK / centre -> P_t         CLS [2B,D], [n_l*B,D] -> DINO head -> z_s
    masked patches [M,D] -> iBOT head -> SK -> P_t        masked patches [M,D] -> iBOT head -> z_s

    loss = 1.0 DINO(z_s, P_t) + 1.0 iBOT(z_s, P_t) + 0.1 sum_crops KoLeo(student CLS of the crop)
           + w_Gram * Gram(student patches of the global crops, Gram teacher's patches)   (DINOv3, gram.*)

    Gram teacher (cfg.gram.weight > 0): a frozen earlier backbone (dinolite.gram_teacher) that sees the
    global crops (or the same boxes at gram.teacher_scale x the size: batch["gram_crops"]).

Everything random (drop path) is driven by torch's global RNG, which the loop seeds from
(seed, step), so a step is a pure function of the weights, the batch and the step number.
"""
import contextlib

import torch
from torch import nn

from dinolite.centering import SoftmaxCenter, sinkhorn_knopp
from dinolite.ema import make_teacher
from dinolite.gram_teacher import GramTeacher
from dinolite.heads import DINOHead
from dinolite.losses import DINOLoss, IBOTPatchLoss, gram_loss
from dinolite.losses.koleo import KoLeoLoss
from dinolite.models import VisionTransformer
from dinolite.checkpoint import CheckpointError
from dinolite.train.config import Config


def build_backbone(cfg: Config) -> VisionTransformer:
    m = cfg.model
    return VisionTransformer(
        img_size=m.img_size, patch_size=m.patch_size, embed_dim=m.embed_dim, depth=m.depth,
        num_heads=m.num_heads, ffn_ratio=m.ffn_ratio, ffn=m.ffn, drop_path_rate=m.drop_path_rate,
        layerscale_init=m.layerscale_init if m.layerscale_init > 0 else None,
        num_register_tokens=m.num_register_tokens, pos_embed=m.pos_embed,
        norm_eps=m.norm_eps if m.norm_eps > 0 else None, drop_path_mode=m.drop_path_mode,
        qkv_bias=m.qkv_bias, mask_k_bias=m.mask_k_bias, untie_global_and_local_cls_norm=m.untie_local_cls_norm,
        rope_shift_coords=m.rope_shift_coords or None, rope_jitter_coords=m.rope_jitter_coords or None,
        rope_rescale_coords=m.rope_rescale_coords or None,
    )


def build_student(cfg: Config) -> nn.ModuleDict:
    """backbone + dino_head + ibot_head (the same module when cfg.head.share_heads)."""
    h = cfg.head
    backbone = build_backbone(cfg)
    dino_head = DINOHead(cfg.model.embed_dim, h.dino_out_dim, h.hidden_dim, h.bottleneck_dim, h.n_layers,
                         weight_norm_last_layer=h.weight_norm_last_layer)
    if h.share_heads:
        ibot_head = dino_head
    else:
        ibot_head = DINOHead(cfg.model.embed_dim, h.ibot_out_dim, h.ibot_hidden_dim or h.hidden_dim,
                             h.ibot_bottleneck_dim or h.bottleneck_dim, h.n_layers,
                             weight_norm_last_layer=h.weight_norm_last_layer)
    return nn.ModuleDict(dict(backbone=backbone, dino_head=dino_head, ibot_head=ibot_head))


def build_student_on_meta_and_init(cfg: Config, device="cpu") -> nn.ModuleDict:
    """build_student on the meta device (no memory), materialised on `device` with to_empty() and initialised
    by the explicit init_weights() of the backbone and heads (torch's global RNG: seed it first)."""
    with torch.device("meta"):
        student = build_student(cfg)
    student.to_empty(device=device)
    with torch.no_grad():
        student.backbone.init_weights()
        student.dino_head.init_weights()
        if student.ibot_head is not student.dino_head:
            student.ibot_head.init_weights()
    return student


class DINOv2MetaArch(nn.Module):
    """Student, teacher and the teacher-side centering state.

    Args:
        cfg: the training Config.
        device: where to build the weights.
        meta_init: build on the meta device (no memory), then materialise with to_empty() and run
            the explicit init_weights() of the backbone and heads: the path a sharded (FSDP2)
            run takes. Either way the teacher starts as an exact copy of the student.
        student, teacher, gram_teacher: modules built elsewhere (scale/ passes FSDP2-sharded ones, already
            materialised, the teacher equal to the student); default: built here from cfg.
        koleo_group_size: ranks whose images form one KoLeo batch (dinolite.losses.KoLeoLoss): 1 (each rank
            alone, DINOv2), None (all ranks: the same loss as one process holding the global batch).
    """

    def __init__(self, cfg: Config, device="cpu", meta_init: bool = False, student: nn.Module | None = None,
                 teacher: nn.Module | None = None, gram_teacher: nn.Module | None = None,
                 koleo_group_size: int | None = 1):
        super().__init__()
        if cfg.head.share_heads and cfg.head.ibot_out_dim != cfg.head.dino_out_dim:
            raise ValueError("head.share_heads=True needs head.ibot_out_dim == head.dino_out_dim "
                             f"(got {cfg.head.ibot_out_dim} and {cfg.head.dino_out_dim})")
        if (student is None) != (teacher is None):
            raise ValueError("pass both a student and a teacher, or neither")
        if student is None and meta_init:
            student = build_student_on_meta_and_init(cfg, device)
        elif student is None:
            student = build_student(cfg).to(device)
        self.cfg = cfg
        self.student = student
        self.teacher = make_teacher(student) if teacher is None else teacher  # a copy, frozen, eval mode
        self.centering = cfg.loss.centering
        if self.centering == "softmax_center":
            self.dino_center = SoftmaxCenter(cfg.head.dino_out_dim, cfg.loss.center_momentum).to(device)
            self.ibot_center = SoftmaxCenter(cfg.head.ibot_out_dim, cfg.loss.center_momentum).to(device)
        # Multi-crop packing (one pass over the blocks for every crop size) on GPUs; on CPUs each crop size
        # makes its own pass, which we measured 2-4% faster there (see VisionTransformer.forward_features_list).
        self.pack_crops: bool | None = None  # None: by device; True/False to force
        self.dino_loss = DINOLoss(cfg.loss.student_temp)
        self.ibot_loss = IBOTPatchLoss(cfg.loss.student_temp)
        self.koleo_loss = KoLeoLoss(group_size=koleo_group_size)
        self.gram_teacher = gram_teacher
        if cfg.gram.weight > 0 and gram_teacher is None:
            g = cfg.gram
            if not g.teacher:
                raise CheckpointError("gram.weight > 0 needs a Gram teacher: set gram.teacher=RUN_DIR (with "
                                 "gram.teacher_step=STEP), a checkpoint file or an official-layout file")
            self.gram_teacher = GramTeacher(self.student.backbone, g.update_every, g.first_update, g.max_updates)
            self.gram_teacher.load(g.teacher, None if g.teacher_step < 0 else g.teacher_step).to(device)

    def train(self, mode: bool = True):
        """Switch the student only: the teacher always stays in eval mode (no drop path)."""
        super().train(mode)
        self.teacher.eval()
        return self

    def _teacher_probs(self, logits: torch.Tensor, teacher_temp: float, center_name: str) -> torch.Tensor:
        """Teacher logits [N, K] -> centred, sharpened targets [N, K] in fp32."""
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(logits.float(), teacher_temp)
        center = getattr(self, center_name)
        probs = center(logits.float(), teacher_temp)
        center.update(logits.float())
        return probs

    @torch.no_grad()
    def teacher_targets(self, batch: dict, teacher_temp: float, autocast) -> dict:
        """The teacher's targets: DINO probs [2, B, K] and iBOT probs at the masked patches [M, K]."""
        global_crops, mask_indices = batch["global_crops"], batch["mask_indices"]
        n_images = global_crops.shape[0]
        with autocast():
            out = self.teacher.backbone.forward_features(global_crops)
            cls = out["x_norm_clstoken"]  # [2B, D]
            patches = out["x_norm_patchtokens"].flatten(0, 1)[mask_indices]  # [M, D]
            if self.teacher.ibot_head is self.teacher.dino_head:
                logits = self.teacher.dino_head(torch.cat([cls, patches]))
                cls_logits, patch_logits = logits[:n_images], logits[n_images:]
            else:
                cls_logits = self.teacher.dino_head(cls)
                patch_logits = self.teacher.ibot_head(patches)
        dino_probs = self._teacher_probs(cls_logits, teacher_temp, "dino_center")
        # Called with 0 masked patches too: SK and the centre's update are collectives every rank must join.
        ibot_probs = self._teacher_probs(patch_logits, teacher_temp, "ibot_center")
        return dict(dino=dino_probs.view(2, n_images // 2, -1), ibot=ibot_probs)

    def forward_losses(self, batch: dict, teacher_temp: float, autocast=contextlib.nullcontext,
                       gram_weight: float = 0.0, local_dino_weight: float = 1.0) -> dict:
        """All losses of one step. Returns a dict of fp32 scalars: loss (weighted total), dino,
        ibot, koleo, gram (with a Gram teacher; logged also while its weight is 0), and detached
        tensors for the monitors: teacher_probs [2B, K],
        student_logits [2B, K] (global crops), student_cls [2B, D].

        batch: dict from collate_multicrop (global_crops [2B,3,G,G] crop-major, local_crops
        [n_l*B,3,L,L] or None, masks [2B,N], mask_indices [M], masks_weight [M]).
        """
        w = self.cfg.loss
        global_crops, local_crops = batch["global_crops"], batch["local_crops"]
        masks, mask_indices = batch["masks"], batch["mask_indices"]
        n_images = global_crops.shape[0]
        if n_images % 2:
            raise ValueError(f"global_crops must hold 2 crops per image (crop-major), got {n_images} rows")
        B = n_images // 2
        n_local = 0 if local_crops is None else local_crops.shape[0] // B

        targets = self.teacher_targets(batch, teacher_temp, autocast)

        with autocast():
            pack = self.pack_crops if self.pack_crops is not None else global_crops.device.type != "cpu"
            if n_local:
                outs = self.student.backbone.forward_features_list([global_crops, local_crops], [masks, None], pack=pack)
            else:
                outs = self.student.backbone.forward_features_list([global_crops], [masks])
            global_cls = outs[0]["x_norm_clstoken"]  # [2B, D]
            patches = outs[0]["x_norm_patchtokens"].flatten(0, 1)[mask_indices]  # [M, D]
            cls_all = torch.cat([global_cls, outs[1]["x_norm_clstoken"]]) if n_local else global_cls
            # One head call per head over every token it sees (as DINOv2 does).
            if self.student.ibot_head is self.student.dino_head:
                logits = self.student.dino_head(torch.cat([cls_all, patches]))
                cls_logits, patch_logits = logits[:len(cls_all)], logits[len(cls_all):]
            else:
                cls_logits = self.student.dino_head(cls_all)
                patch_logits = self.student.ibot_head(patches)

        # Losses in fp32.
        K = cls_logits.shape[-1]
        cls_logits = cls_logits.float()
        student_global = cls_logits[:n_images].view(2, B, K)
        student_local = cls_logits[n_images:].view(n_local, B, K) if n_local else None
        dino = self.dino_loss(student_global, student_local, targets["dino"], local_weight=local_dino_weight)
        if len(mask_indices) > 0:
            ibot = self.ibot_loss(patch_logits.float(), targets["ibot"], batch["masks_weight"], n_images)
        else:
            ibot = patch_logits.float().sum() * 0.0
        koleo = sum(self.koleo_loss(crop_cls) for crop_cls in global_cls.float().chunk(2))
        loss = w.dino_weight * dino + w.ibot_weight * ibot + w.koleo_weight * koleo
        extra = {}
        if self.gram_teacher is not None:
            # The student's final-norm patch tokens of the global crops, masked positions included.
            patch = self.cfg.model.patch_size
            grid = (global_crops.shape[-2] // patch, global_crops.shape[-1] // patch)
            with autocast():
                teacher_patches = self.gram_teacher.patch_features(batch.get("gram_crops", global_crops), grid)
            gram = gram_loss(outs[0]["x_norm_patchtokens"], teacher_patches, img_level=self.cfg.gram.img_level,
                             remove_neg=self.cfg.gram.remove_neg)
            loss = loss + gram_weight * gram
            extra["gram"] = gram.detach()
        return dict(
            loss=loss, dino=dino.detach(), ibot=ibot.detach(), koleo=koleo.detach(), **extra,
            teacher_probs=targets["dino"].flatten(0, 1).detach(),
            student_logits=student_global.flatten(0, 1).detach(),
            student_cls=global_cls.detach().float(),
        )
