"""AdamW parameter groups for DINOv2 training and the per-step schedule of every hyper-parameter.

Rules (DINOv2 official code, see REFERENCE.md "Training recipe"):
- layer-wise lr decay: a backbone parameter with layer id l gets lr * decay ** (depth + 1 - l);
  layer id 0 for patch_embed, pos_embed, cls_token, register_tokens, mask_token (and the RoPE
  periods if they were a parameter), i + 1 for blocks.i.*, depth + 1 (multiplier 1) for the
  final norm. The heads are not part of the backbone: multiplier 1.
- patch_embed parameters: an extra lr x patch_embed_lr_mult (0.2).
- no weight decay for names ending in ".bias" or containing "norm" or "gamma" (LayerScale).
  As in the official code, the tokens and the position embedding DO get weight decay.
- the heads' last (prototype) layer is frozen (lr 0) for the first freeze_last_layer_epochs.
"""
import math
from dataclasses import dataclass

import torch
from torch import nn

from dinolite import schedules
from dinolite.train.config import Config

_LAYER_ZERO = ("patch_embed", "pos_embed", "cls_token", "register_tokens", "mask_token", "rope_embed")


def backbone_layer_id(name: str, depth: int) -> int:
    """Layer id of a backbone parameter `name` (relative to the backbone): 0 .. depth + 1."""
    first = name.split(".")[0]
    if first in _LAYER_ZERO:
        return 0
    if first == "blocks":
        return int(name.split(".")[1]) + 1
    return depth + 1


def param_rule(name: str, depth: int, layerwise_decay: float, patch_embed_lr_mult: float) -> dict:
    """{lr_mult, wd_mult, is_last_layer} for a student parameter name.

    `name` is prefixed by its sub-module: "backbone.blocks.3.attn.qkv.weight",
    "dino_head.mlp.0.bias", "ibot_head.last_layer.weight", ...
    """
    module, _, rest = name.partition(".")
    lr_mult = 1.0
    if module == "backbone":
        lr_mult = layerwise_decay ** (depth + 1 - backbone_layer_id(rest, depth))
        if rest.startswith("patch_embed"):
            lr_mult *= patch_embed_lr_mult
    no_decay = name.endswith(".bias") or "norm" in name or "gamma" in name
    return {
        "lr_mult": lr_mult,
        "wd_mult": 0.0 if no_decay else 1.0,
        "is_last_layer": module != "backbone" and "last_layer" in name,
    }


def build_param_groups(student: nn.Module, depth: int, layerwise_decay: float = 0.9,
                       patch_embed_lr_mult: float = 0.2) -> list[dict]:
    """Fuse the student's trainable parameters into AdamW groups with equal rules.

    Each group carries "lr_mult", "wd_mult", "is_last_layer" and "names" (for tests and logs);
    `apply_schedule_` turns them into "lr" and "weight_decay" every step.
    """
    groups = {}
    for name, param in student.named_parameters():  # shared heads are listed once
        if not param.requires_grad:
            continue
        rule = param_rule(name, depth, layerwise_decay, patch_embed_lr_mult)
        key = (rule["lr_mult"], rule["wd_mult"], rule["is_last_layer"])
        group = groups.setdefault(key, {"params": [], "names": [], **rule})
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


def build_optimizer(student: nn.Module, cfg: Config) -> torch.optim.AdamW:
    groups = build_param_groups(student, cfg.model.depth, cfg.optim.layerwise_decay,
                                cfg.optim.patch_embed_lr_mult)
    # lr and weight decay are overwritten every step by apply_schedule_.
    # foreach: one kernel per group and op instead of one per tensor (many small tensors here).
    return torch.optim.AdamW(groups, lr=0.0, weight_decay=0.0, foreach=True,
                             betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2))


def student_modules(student: nn.ModuleDict) -> dict[str, nn.Module]:
    """The student's modules as the official trainers clip them, each once: {"backbone", "dino_head",
    "ibot_head"}; a shared iBOT head (the same module as dino_head) is not listed again, as DINOv2 leaves it
    out of its student dict."""
    modules = {}
    for name, module in student.items():
        if all(module is not seen for seen in modules.values()):
            modules[name] = module
    return modules


@torch.no_grad()
def clip_grad_norm_per_module_(modules: dict[str, nn.Module], max_norm: float) -> dict[str, torch.Tensor]:
    """Clip each module's gradient by its own L2 norm, as DINOv2 and DINOv3 do (train.py: one
    clip_grad_norm_ per student module). Returns {name: the module's norm before clipping}.

    Norms (40, 10, 5) with max_norm 30 become (30, 10, 5); a joint clip would scale all three by
    30 / 41.5 = 0.72 (28.9, 7.2, 3.6).
    max_norm <= 0: no clipping (the norms are still returned).
    """
    max_norm = max_norm if max_norm > 0 else math.inf
    return {name: torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.grad is not None],
                                                 max_norm).detach()
            for name, module in modules.items()}


def total_grad_norm(norms: dict[str, torch.Tensor]) -> torch.Tensor:
    """The L2 norm of the whole gradient from the modules' norms (before clipping): sqrt(sum of squares)."""
    return torch.stack([n.float() for n in norms.values()]).square().sum().sqrt()


@dataclass
class StepValues:
    """Every scheduled hyper-parameter at one step."""

    lr: float
    last_layer_lr: float
    weight_decay: float
    momentum: float  # teacher EMA momentum
    teacher_temp: float
    gram_weight: float = 0.0  # weight of the Gram anchoring loss (0: off)
    local_dino_weight: float = 1.0  # weight of the DINO local-crop pairs


def schedule_values(cfg: Config, step: int, total_steps: int, epoch_length: int,
                    global_batch: int) -> StepValues:
    """The DINOv2 schedules (dinolite.schedules), pure functions of the step, so that a
    resumed run sees exactly the values of an uninterrupted one."""
    o, lo = cfg.optim, cfg.loss
    warmup = min(total_steps, int(round(o.warmup_epochs * epoch_length)))
    freeze = int(round(o.freeze_last_layer_epochs * epoch_length))
    temp_warmup = int(round(lo.warmup_teacher_temp_epochs * epoch_length))
    lr = learning_rate(cfg, step, total_steps, warmup, global_batch)
    return StepValues(
        lr=lr,
        last_layer_lr=0.0 if step < freeze else lr,
        weight_decay=schedules.weight_decay(step, total_steps, o.weight_decay, o.weight_decay_end),
        momentum=schedules.teacher_momentum(step, total_steps, o.momentum_teacher, o.final_momentum_teacher),
        teacher_temp=schedules.teacher_temperature(step, temp_warmup, lo.warmup_teacher_temp, lo.teacher_temp),
        **gram_values(cfg, step, total_steps, epoch_length),
    )


def learning_rate(cfg: Config, step: int, total_steps: int, warmup: int, global_batch: int) -> float:
    """The lr at `step`: base_lr scaled by optim.scaling_rule, shaped by optim.lr_schedule."""
    o = cfg.optim
    peak = schedules.scaled_learning_rate(o.base_lr, global_batch, o.scaling_rule)
    if o.lr_schedule == "constant":  # dinov3_vit7b16_pretrain.yaml:152-157 (start 0, peak = end)
        return schedules.warmup_cosine_constant(step, total_steps, 0.0, peak, peak, warmup)
    if o.lr_schedule == "cosine_rise":  # dinov3_vit7b16_high_res_adapt.yaml:203-209 (peak 0, end, cosine_epochs)
        return schedules.warmup_cosine_constant(step, total_steps, 0.0, 0.0, peak, 0, warmup)
    return schedules.learning_rate(step, total_steps, peak, warmup, o.min_lr)


def gram_values(cfg: Config, step: int, total_steps: int, epoch_length: int) -> dict:
    """The Gram loss weight at `step` and the local-crop DINO weight, which DINOv3 lowers (1 -> 0.5): both ramp on
    the same cosine over gram.warmup_epochs from gram.start_epoch, as the official yaml's two schedules do."""
    g = cfg.gram
    if g.weight == 0.0:
        return dict(gram_weight=0.0, local_dino_weight=1.0)
    start = int(round(g.start_epoch * epoch_length))
    warmup = int(round(g.warmup_epochs * epoch_length))
    weight = schedules.gram_weight(step, total_steps, g.weight, start, warmup,
                                   None if g.final_weight < 0 else g.final_weight)
    local = schedules.local_dino_weight(step, g.local_dino_weight, start, warmup)
    return dict(gram_weight=weight, local_dino_weight=local)


def apply_schedule_(optimizer: torch.optim.Optimizer, values: StepValues) -> None:
    """Write this step's lr and weight decay into every group (times the group's multipliers)."""
    for group in optimizer.param_groups:
        base = values.last_layer_lr if group["is_last_layer"] else values.lr
        group["lr"] = base * group["lr_mult"]
        group["weight_decay"] = values.weight_decay * group["wd_mult"]
