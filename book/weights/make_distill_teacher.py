"""Make the distillation teacher of chapter 10 in book/weights/: a wider, deeper tiny ViT (width 128, 6 blocks,
patch 8) trained longer (500 steps, five times the students' budget) on the built-in textures, saved WITH its DINO/iBOT head.

    .venv/bin/python book/weights/make_distill_teacher.py              # train (or resume), export, measure
    .venv/bin/python book/weights/make_distill_teacher.py --skip-train # export and measure an existing run

1. Trains with `python -m dinolite.train` (TRAIN_ARGS below) into runs/distill_teacher; re-running resumes.
2. Saves the EMA teacher of the last step (backbone + head, fp16 to stay under 5 MB, one copy of the shared
   head) with its config as book/weights/textures_p8_teacher.pth: a dinolite checkpoint that distillation
   loads directly (teacher.checkpoint=book/weights/textures_p8_teacher.pth).
3. Measures the saved teacher (as loaded, i.e. after the fp16 rounding) and the same network at initialisation
   with dinolite.train.distill.texture_scores (kNN and linear on textures, dense probe on TextureMosaics) and
   writes command, config, metrics, sha256 and size under "distill_teacher" in book/weights/reference.json.
   tests/test_reference_weights.py re-checks the hash and the kNN score.
"""
import argparse
import json
import os
import sys
import time

import torch
from weights_helper import WEIGHTS, command_line, save_checked, train, train_seconds, update_reference

RUN_DIR = "runs/distill_teacher"
DATA = "textures:n=10000,size=32"
TRAIN_ARGS = [
    "--config", "tiny-cpu", "--data", DATA, "--output-dir", RUN_DIR,
    "model.embed_dim=128", "model.depth=6", "model.num_heads=4", "train.epochs=5", "train.epoch_length=100",
    "train.checkpoint_every=250", "train.keep_last=100", "train.knn_every=250", "train.log_every=25",
    "train.monitor_every=100", "train.progress=false", "train.seed=0",
]
NAME = "textures_p8_teacher"
QUICK = {"knn_train": 1000, "knn_test": 500, "seed": 100, "tolerance": 0.6}  # the test's re-measurement


def quick_knn(backbone) -> float:
    """kNN top-1 (%) on textures with QUICK's images (what the test re-measures, ~10 s)."""
    from dinolite.data import EvalTransform, SyntheticTextures
    from dinolite.eval import extract_features, knn_classify

    t = EvalTransform(None, None)
    a = extract_features(backbone, SyntheticTextures(QUICK["knn_train"], 32, seed=QUICK["seed"], transform=t),
                         progress=False)
    b = extract_features(backbone, SyntheticTextures(QUICK["knn_test"], 32, seed=QUICK["seed"] + 100, transform=t),
                         progress=False)
    return round(float(knn_classify(a["cls"], a["labels"], b["cls"], b["labels"], k=20)["top1"]), 2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-train", action="store_true", help="use the run in runs/distill_teacher as it is")
    args = parser.parse_args(argv)
    train(TRAIN_ARGS, skip=args.skip_train)

    from dinolite.checkpoint import latest_checkpoint, load_checkpoint
    from dinolite.train import apply_overrides, get_config
    from dinolite.train.config import config_to_dict, load_config
    from dinolite.train.distill import load_frozen_teacher, texture_scores
    from dinolite.train.meta_arch import build_backbone

    cfg = load_config(os.path.join(RUN_DIR, "config.yaml"))
    state = load_checkpoint(latest_checkpoint(RUN_DIR))
    if state["step"] != cfg.total_steps:
        raise SystemExit(f"{RUN_DIR} stopped at step {state['step']} of {cfg.total_steps}; run without --skip-train")
    teacher = {k: v.half() if v.is_floating_point() else v for k, v in state["teacher"].items()
               if not (cfg.head.share_heads and k.startswith("ibot_head."))}  # a shared head is saved once
    path = WEIGHTS / f"{NAME}.pth"
    saved = save_checked({"config": config_to_dict(cfg), "step": state["step"], "teacher": teacher}, path)
    loaded = load_frozen_teacher(apply_overrides(get_config("tiny-cpu-distill"), [f"teacher.checkpoint={path}"]))
    torch.manual_seed(cfg.train.seed)
    initial = build_backbone(cfg).eval()
    tic = time.perf_counter()
    with open(os.path.join(RUN_DIR, "metrics.jsonl")) as f:
        curve = [r for r in map(json.loads, f) if "knn_top1" in r]
    entry = {
        "about": "The distillation teacher of chapter 10 (dinolite), made by book/weights/make_distill_teacher.py: "
                 "{config, step, teacher: backbone.* and dino_head.* (shared with iBOT) in fp16}.",
        "command": command_line(TRAIN_ARGS),
        "config": config_to_dict(cfg), "seed": cfg.train.seed, "total_steps": cfg.total_steps,
        "train_seconds": train_seconds(RUN_DIR),
        "eval": "dinolite.train.distill.texture_scores: kNN (k=20) and linear probe on [CLS] of 1000 textures "
                "(seed 100) vs 500 (seed 200); dense probe mIoU on 300/200 TextureMosaics (12 classes), 32 px",
        "knn_curve_during_training": [{"step": r["step"], "knn_top1": round(r["knn_top1"], 2)} for r in curve],
        "random_init": texture_scores(initial),
        "quick_check": {**QUICK, "knn_top1": quick_knn(loaded.backbone)},
        "file": saved["file"], "step": state["step"], "dtype": "float16", "bytes": saved["bytes"],
        "sha256": saved["sha256"], "metrics": texture_scores(loaded.backbone),
    }
    entry["measure_seconds"] = round(time.perf_counter() - tic, 1)
    update_reference({"distill_teacher": entry})
    print(json.dumps({"teacher": entry["metrics"], "random_init": entry["random_init"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
