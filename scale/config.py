"""The `dist` section of a scale/ run: how the dinolite config is sharded and launched, not what it computes.

A scale/ run takes the same recipes, YAML files and key=value overrides as `python -m dinolite.train`,
plus `dist.*` keys:

    cfg, dcfg = load_scale_config("vitg14-lvd142m", ["train.batch_size=12", "dist.activation_checkpointing=full"])

A YAML file may carry a `dist:` section next to model/head/loss/...; config.yaml in a run directory does.
Checkpoint cadence and retention are dinolite's train.checkpoint_every and train.keep_last.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import yaml

from dinolite.train.config import Config, apply_overrides, config_from_dict, config_to_dict, set_value
from dinolite.train.recipes import get_config


@dataclass
class DistConfig:
    activation_checkpointing: str = "none"  # "none", "full" or "selective" (keep matmul/attention outputs)
    compile: bool = False  # torch.compile each transformer block (after activation checkpointing)
    reshard_after_forward: bool = True  # free each block's gathered weights after its forward (ZeRO-3)
    param_dtype: str = "auto"  # FSDP2 MixedPrecisionPolicy: weights gathered in this dtype for compute
    # ("auto": bf16 when train.precision is bf16, else fp32)
    reduce_dtype: str = "fp32"  # gradients reduce-scattered in this dtype
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this (0: none)
    koleo_group_size: int = 1  # ranks that search KoLeo neighbours together: 1 (DINOv2), 0 (all ranks)
    # KoLeo neighbours within groups of this many samples of the global batch, a multiple of train.batch_size
    # (DINOv3's koleo_distributed_loss_group_size, dinov3/loss/koleo_loss.py:84-100); 0: koleo_group_size decides
    koleo_group_samples: int = 0


@dataclass
class _WithDist:
    """Lets dinolite's set_value parse dotted dist.* keys."""

    dist: DistConfig = field(default_factory=DistConfig)


# Each official recipe's distributed settings (a recipe's dist.* defaults; overrides and a YAML's dist: section win):
# dinov3_vit7b16_pretrain.yaml:54-56 (checkpointing true, checkpointing_full false: selective; compile true),
# dinov3_vit7b16_gram_anchor.yaml:83-85 and dinov3_vit7b16_high_res_adapt.yaml:82-84 (full; compile true),
# high_res_adapt.yaml:19-22 (distributed KoLeo over groups of 16 samples).
RECIPE_DIST = {
    "dinov3-vit7b16-pretrain": dict(compile=True, activation_checkpointing="selective"),
    "dinov3-vit7b16-gram": dict(compile=True, activation_checkpointing="full"),
    "dinov3-vit7b16-highres": dict(compile=True, activation_checkpointing="full", koleo_group_samples=16),
}

_DTYPES = ("bf16", "fp32")
# dist keys that may change when resuming: they change memory and speed, not what is computed.
RESUMABLE_DIST_KEYS = {"dist.activation_checkpointing", "dist.compile", "dist.reshard_after_forward",
                       "dist.keep_every"}


def dist_keys() -> list[str]:
    return [f"dist.{f.name}" for f in dataclasses.fields(DistConfig)]


def validate_dist(d: DistConfig) -> None:
    def check(ok, key, msg):
        if not ok:
            raise ValueError(f"config key 'dist.{key}': {msg}")

    check(d.activation_checkpointing in ("none", "full", "selective"), "activation_checkpointing",
          f"must be 'none', 'full' or 'selective', got {d.activation_checkpointing!r}")
    check(d.param_dtype in ("auto", *_DTYPES), "param_dtype",
          f"must be 'auto', 'bf16' or 'fp32', got {d.param_dtype!r}")
    check(d.reduce_dtype in _DTYPES, "reduce_dtype", f"must be 'bf16' or 'fp32', got {d.reduce_dtype!r}")
    check(d.keep_every >= 0, "keep_every", "must be >= 0 (0: keep only the last train.keep_last)")
    check(d.koleo_group_size >= 0, "koleo_group_size", "must be >= 0 (0: all ranks, 1: each rank alone)")
    check(d.koleo_group_samples >= 0, "koleo_group_samples", "must be >= 0 (0: use dist.koleo_group_size)")


def split_dist(d: dict) -> tuple[dict, dict]:
    """A nested config dict -> (dinolite part, dist part)."""
    d = dict(d)
    dist = d.pop("dist", None) or {}
    if not isinstance(dist, dict):
        raise ValueError(f"the dist section must be a mapping of keys, got {dist!r}")
    return d, dist


def dist_from_dict(d: dict, overrides: list[str] = ()) -> DistConfig:
    holder = _WithDist()
    for key, value in d.items():
        _set_dist(holder, f"dist.{key}", value)
    for item in overrides:
        key, raw = item.split("=", 1)
        _set_dist(holder, key.strip(), raw.strip())
    validate_dist(holder.dist)
    return holder.dist


def _set_dist(holder: _WithDist, key: str, raw) -> None:
    try:
        set_value(holder, key, raw)
    except ValueError as e:
        if "unknown config key" in str(e):
            raise ValueError(f"unknown config key {key!r}; dist keys: {', '.join(dist_keys())}") from None
        raise


def load_scale_config(name_or_path: str, overrides: list[str] = ()) -> tuple[Config, DistConfig]:
    """A dinolite recipe or YAML file (optionally with a dist: section) plus key=value overrides."""
    dist_dict = {}
    if os.path.isfile(name_or_path):
        try:
            with open(name_or_path) as f:
                data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{name_or_path} is not valid YAML ({e}); fix it") from None
        if not isinstance(data, dict):
            raise ValueError(f"{name_or_path}: a config must be a mapping of sections")
        data, dist_dict = split_dist(data)
        try:
            cfg = config_from_dict(data)
        except ValueError as e:
            raise ValueError(f"{name_or_path}: {e}") from None
    else:
        cfg = get_config(name_or_path)
        dist_dict = dict(RECIPE_DIST.get(name_or_path, {}))
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value (e.g. optim.base_lr=0.001)")
    dist_overrides = [o for o in overrides if o.strip().startswith("dist.")]
    cfg = apply_overrides(cfg, [o for o in overrides if not o.strip().startswith("dist.")])
    dcfg = dist_from_dict(dist_dict, dist_overrides)
    if dcfg.koleo_group_samples % cfg.train.batch_size:
        raise ValueError(f"config key 'dist.koleo_group_samples': {dcfg.koleo_group_samples} must be a multiple of "
                         f"train.batch_size={cfg.train.batch_size} (whole ranks form a KoLeo group)")
    return cfg, dcfg


def scale_config_to_dict(cfg: Config, dcfg: DistConfig) -> dict:
    return {**config_to_dict(cfg), "dist": dataclasses.asdict(dcfg)}


def save_scale_config(cfg: Config, dcfg: DistConfig, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(scale_config_to_dict(cfg, dcfg), f, sort_keys=False)
