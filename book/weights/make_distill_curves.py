"""Record chapter 10's longer comparison: the width-64 student distilled from the reference teacher against the
same network trained from scratch, over 2,000 steps each, measured every 200 steps.

    .venv/bin/python book/weights/make_distill_curves.py              # train (or resume) both runs, measure
    .venv/bin/python book/weights/make_distill_curves.py --skip-train # measure existing runs

1. Trains both with `python -m dinolite.train` (RUNS below; the same data, seed, steps and schedules' length)
   into runs/distill_curve and runs/scratch_curve, keeping a checkpoint every 200 steps. Re-running resumes.
2. Measures each kept checkpoint's evaluated network (the distilled student's EMA; the scratch run's EMA teacher)
   with `dinolite.train.distill.texture_scores` (kNN and linear probe on textures; the chapter's instrument), and
   the network at initialisation.
3. Saves the two end networks' backbones (fp16, official key layout) to book/weights/distill_curve_<run>.pth, so
   that chapter 10 re-measures the end points on the page, and writes the curves, commands and hashes under
   "distill_curves" in book/weights/reference.json.
"""
import argparse
import json
import os
import sys
import time

import torch
from weights_helper import WEIGHTS, command_line, save_checked, train, train_seconds, update_reference

DATA = "textures:n=10000,size=32"
COMMON = ["train.epochs=20", "train.epoch_length=100", "train.checkpoint_every=200",
          "train.keep_last=100", "train.knn_every=0", "train.monitor_every=0", "train.log_every=50",
          "train.progress=false", "train.seed=0"]
RUNS = {
    "distilled": ["--config", "tiny-cpu-distill", "--data", DATA, "--output-dir", "runs/distill_curve",
                  "teacher.checkpoint=book/weights/textures_p8_teacher.pth"] + COMMON,
    "scratch": ["--config", "tiny-cpu", "--data", DATA, "--output-dir", "runs/scratch_curve",
                "model.embed_dim=64", "model.depth=3", "model.num_heads=2"] + COMMON,
}


def evaluated_backbone(run: str, state: dict, cfg):
    """The network chapter 10 evaluates: the distilled student's EMA, or the scratch run's EMA teacher."""
    from dinolite.train.meta_arch import build_backbone

    weights = state["emas"]["student"] if run == "distilled" else state["teacher"]
    backbone = build_backbone(cfg)
    backbone.load_state_dict({k.removeprefix("backbone."): v for k, v in weights.items() if k.startswith("backbone.")})
    return backbone.eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-train", action="store_true", help="measure the runs in runs/ as they are")
    args = parser.parse_args(argv)
    for train_args in RUNS.values():
        train(train_args, skip=args.skip_train)

    from dinolite import hub
    from dinolite.checkpoint import list_checkpoints, load_checkpoint
    from dinolite.train.config import config_to_dict, load_config
    from dinolite.train.distill import texture_scores
    from dinolite.train.meta_arch import build_backbone

    tic = time.perf_counter()
    entry = {"about": "Chapter 10's distilled student and scratch control over 2,000 steps (one seed), made by "
                      "book/weights/make_distill_curves.py; scores: dinolite.train.distill.texture_scores without the "
                      "dense probe. Files hold the end networks' backbones (dinolite.hub.export_official, fp16).",
             "runs": {}}
    for run, train_args in RUNS.items():
        run_dir = train_args[train_args.index("--output-dir") + 1]
        cfg = load_config(os.path.join(run_dir, "config.yaml"))
        kept = dict(list_checkpoints(run_dir))
        if cfg.total_steps not in kept:
            raise SystemExit(f"{run_dir} stopped before step {cfg.total_steps}: run without --skip-train")
        torch.manual_seed(cfg.train.seed)
        curve = [{"step": 0, **texture_scores(build_backbone(cfg).eval(), dense=False)}]
        for step in sorted(kept):
            backbone = evaluated_backbone(run, load_checkpoint(kept[step]), cfg)
            curve.append({"step": step, **texture_scores(backbone, dense=False)})
            print(run, curve[-1], flush=True)
        saved = save_checked({k: v.half() for k, v in hub.export_official(backbone).items()},
                             WEIGHTS / f"distill_curve_{run}.pth")
        entry["runs"][run] = {"command": command_line(train_args), "config": config_to_dict(cfg),
                              "train_seconds": train_seconds(run_dir), "curve": curve,
                              "end": texture_scores(hub.load_official(build_backbone(cfg), torch.load(
                                  WEIGHTS / saved["file"], weights_only=True)).eval(), dense=False), **saved}
    entry["measure_seconds"] = round(time.perf_counter() - tic, 1)
    update_reference({"distill_curves": entry})
    print(json.dumps({run: e["end"] for run, e in entry["runs"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
