"""DINOv2 training: config system, meta-architecture, training step, loop with exact resume, CLI.

    from dinolite.train import get_config, apply_overrides, train
    cfg = apply_overrides(get_config("tiny-cpu"), ["train.epochs=2"])
    arch = train(cfg, "builtin:n=2000,size=32", output_dir="runs/tiny")
    teacher_backbone = arch.teacher.backbone

Command line: python -m dinolite.train --config tiny-cpu --data builtin --output-dir runs/tiny
"""
from dinolite.train.config import (
    Config,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
    valid_keys,
)
from dinolite.train.loop import train, train_step
from dinolite.train.meta_arch import DINOv2MetaArch, build_student
from dinolite.train.optim import build_optimizer, build_param_groups, param_rule, schedule_values
from dinolite.train.recipes import RECIPES, get_config
from dinolite.train.run import OutputDirError
