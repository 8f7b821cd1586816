"""Make the reference checkpoints in book/weights/: a tiny DINOv2 run on the built-in shapes, with
an EARLY and a LATE teacher, so that chapters can start from a trained model instead of training.

    .venv/bin/python book/weights/make_reference.py            # train (or resume), export, measure
    .venv/bin/python book/weights/make_reference.py --skip-train  # export and measure an existing run

1. Trains with `python -m dinolite.train` (the exact command is TRAIN_ARGS below) into runs/reference,
   keeping every checkpoint (train.keep_last larger than the number of checkpoints). Re-running resumes.
2. Exports the teacher backbone of steps EARLY_STEP and the last step in the official key layout
   (`dinolite.hub.export_official`, fp32; loadable with `dinolite.hub.load_official` and
   `dinolite.gram_teacher.GramTeacher.load`) to book/weights/<name>.pth, and the last checkpoint without
   its optimiser state (`weights_only_state`) to book/weights/shapes_p4_late_state.pth.
3. Measures every kept checkpoint and the network at initialisation on held-out shapes with the
   instruments of `dinolite.eval` (kNN on [CLS]; dense_probe figure-ground and 13-label
   segmentation with per-class IoU; majority and raw-pixel baselines; patch_similarity_agreement),
   and writes everything (command, config, seed, steps, metrics, sha256, sizes, times) to
   book/weights/reference.json. tests/test_reference_weights.py re-checks the hashes and one metric.
"""
import argparse
import json
import os
import sys
import time

import torch
from weights_helper import WEIGHTS, command_line, save_checked, train, train_seconds, update_reference

RUN_DIR = "runs/reference"
DATA = "builtin:n=10000,size=32"
TRAIN_ARGS = [
    "--config", "tiny-cpu", "--data", DATA, "--output-dir", RUN_DIR,
    "model.img_size=32", "model.patch_size=4", "train.epochs=20", "train.epoch_length=100",
    "train.checkpoint_every=250", "train.keep_last=100", "train.knn_every=250", "train.log_every=25",
    "train.monitor_every=100", "train.progress=false", "train.seed=0",
]
EARLY_STEP = 250  # the best dense and kNN scores of the run (see reference.json's curve)
NAMES = {"early": "shapes_p4_early", "late": "shapes_p4_late"}
STATE_NAME = "shapes_p4_late_state"  # the last checkpoint without optimiser state: to continue training from

# Evaluation data: new images of the built-in shapes (other generator seeds than the training data).
EVAL = {"image_size": 32, "train_images": 600, "train_seed": 100, "test_images": 300, "test_seed": 200}
# The quick check the test repeats (< 20 s): patch-similarity agreement on few images, nothing fitted.
QUICK = {"test_images": 100, "test_seed": 200, "min_purity": 0.75, "tolerance": 0.002}


def shapes(num_images, seed, size=32):
    from dinolite.data import EvalTransform, SyntheticShapes

    return SyntheticShapes(num_images, size, seed=seed, transform=EvalTransform(None, None), return_mask=True)


def quick_metric(backbone) -> float:
    """Within-image patch-similarity agreement (ROC AUC) on QUICK's shapes: deterministic, ~1 s."""
    from dinolite.eval import extract_features, patch_similarity_agreement

    data = shapes(QUICK["test_images"], QUICK["test_seed"])
    feats = extract_features(backbone, data, patch_tokens=True, progress=False)
    return patch_similarity_agreement(feats["patch"], feats["masks"], 13, min_purity=QUICK["min_purity"])["auc"]


def measure(backbone, cfg, full: bool) -> dict:
    """kNN top-1 on shapes; dense probe (figure-ground, and with full the 13 labels) with per-class IoU;
    patch-similarity agreement within images and across images (shape patches only)."""
    from dinolite.data import build_dataset
    from dinolite.eval import dense_probe, extract_features, patch_similarity_agreement
    from dinolite.eval import knn_accuracy
    from dinolite.train.run import knn_datasets

    knn = knn_accuracy(backbone, knn_datasets(build_dataset(DATA), cfg), k=cfg.train.knn_k)
    train = extract_features(backbone, shapes(EVAL["train_images"], EVAL["train_seed"]), patch_tokens=True, progress=False)
    test = extract_features(backbone, shapes(EVAL["test_images"], EVAL["test_seed"]), patch_tokens=True, progress=False)
    out = {"knn_top1": round(knn, 2)}
    tasks = {"figure_ground": ((train["masks"] > 0).long(), (test["masks"] > 0).long(), 2)}
    if full:
        tasks["shape_classes"] = (train["masks"], test["masks"], 13)
    for task, (y, yt, num_classes) in tasks.items():
        r = dense_probe(train["patch"], y, test["patch"], yt, num_classes)
        out[f"dense_{task}_miou"] = round(r["miou"], 2)
        out[f"dense_{task}_iou"] = [None if v != v else round(100 * v, 2) for v in r["iou"].tolist()]
        out[f"dense_{task}_probe"] = {"lr": r["lr"], "class_weights": r["class_weights"]}
    within = patch_similarity_agreement(test["patch"], test["masks"], 13)
    across = patch_similarity_agreement(test["patch"], torch.where(test["masks"] > 0, test["masks"], 255), 13,
                                        pairs="across")
    out.update(patch_agreement_within_auc=round(within["auc"], 4), patch_agreement_within_ap=round(within["ap"], 4),
               patch_agreement_across_auc=round(across["auc"], 4), patch_agreement_across_ap=round(across["ap"], 4))
    out["quick_patch_agreement_auc"] = round(quick_metric(backbone), 5)
    return out


def baselines() -> dict:
    """What a probe that learned nothing (majority class) and one on raw patch pixels score."""
    from dinolite.eval import dense_probe, majority_baseline, patch_similarity_agreement, patchify

    train, test = shapes(EVAL["train_images"], EVAL["train_seed"]), shapes(EVAL["test_images"], EVAL["test_seed"])
    images, masks = (torch.stack(t) for t in zip(*[(train[i][0], train[i][2]) for i in range(len(train))]))
    images_t, masks_t = (torch.stack(t) for t in zip(*[(test[i][0], test[i][2]) for i in range(len(test))]))
    pixels, pixels_t = patchify(images, 4), patchify(images_t, 4)
    out = {"majority": {}, "raw_pixels": {}}
    for task, (y, yt, num_classes) in {"figure_ground": ((masks > 0).long(), (masks_t > 0).long(), 2),
                                       "shape_classes": (masks, masks_t, 13)}.items():
        m = majority_baseline(y, yt, num_classes)
        out["majority"][f"dense_{task}_miou"] = round(m["miou"], 2)
        out["majority"][f"dense_{task}_iou"] = [None if v != v else round(100 * v, 2) for v in m["iou"].tolist()]
        r = dense_probe(pixels, y, pixels_t, yt, num_classes)
        out["raw_pixels"][f"dense_{task}_miou"] = round(r["miou"], 2)
        out["raw_pixels"][f"dense_{task}_iou"] = [None if v != v else round(100 * v, 2) for v in r["iou"].tolist()]
    within = patch_similarity_agreement(pixels_t, masks_t, 13)
    across = patch_similarity_agreement(pixels_t, torch.where(masks_t > 0, masks_t, 255), 13, pairs="across")
    out["raw_pixels"].update(patch_agreement_within_auc=round(within["auc"], 4),
                             patch_agreement_across_auc=round(across["auc"], 4))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-train", action="store_true", help="use the run in runs/reference as it is")
    args = parser.parse_args(argv)
    train(TRAIN_ARGS, skip=args.skip_train)

    from dinolite import hub
    from dinolite.checkpoint import list_checkpoints, weights_only_state
    from dinolite.train.config import config_to_dict, load_config
    from dinolite.train.meta_arch import build_backbone

    cfg = load_config(os.path.join(RUN_DIR, "config.yaml"))
    kept = dict(list_checkpoints(RUN_DIR))
    if cfg.total_steps not in kept or EARLY_STEP not in kept:
        raise SystemExit(f"{RUN_DIR} lacks the checkpoints of steps {EARLY_STEP} and {cfg.total_steps}: "
                         f"kept {sorted(kept)}; run without --skip-train")

    def teacher(step):
        backbone = build_backbone(cfg)
        return hub.load_official(backbone, torch.load(kept[step], map_location="cpu", weights_only=False)).eval()

    torch.manual_seed(cfg.train.seed)
    initial = build_backbone(cfg).eval()  # the run's initialisation (train() seeds the same way)
    tic = time.perf_counter()
    report = {
        "about": "Teacher backbones of one tiny DINOv2 run on the built-in shapes (dinolite), made by "
                 "book/weights/make_reference.py. Files hold dinolite.hub.export_official(backbone), fp32.",
        "command": command_line(TRAIN_ARGS),
        "config": config_to_dict(cfg),
        "seed": cfg.train.seed,
        "total_steps": cfg.total_steps,
        "train_seconds": train_seconds(RUN_DIR),
        "eval": {**EVAL, "data": "SyntheticShapes style=full (the `builtin` data), EvalTransform(None, None)",
                 "knn": "teacher [CLS], k=20, T=0.07; memory: 1000 training images, queries: 500 of seed "
                        "1000003 (dinolite.train.run.knn_datasets)",
                 "dense": "dinolite.eval.dense_probe defaults; mIoU in percent over classes present",
                 "patch_agreement": "dinolite.eval.patch_similarity_agreement, min_purity 0.75; across: "
                                    "200000 random pairs of shape patches of two images"},
        "quick_check": QUICK,
        "baselines": baselines(),
        "random_init": measure(initial, cfg, full=True),
        "curve": [],
        "weights": {},
    }
    metrics_of = {}
    for step in sorted(kept):
        print(f"measuring step {step}", flush=True)
        full = step in (EARLY_STEP, cfg.total_steps)
        metrics_of[step] = measure(teacher(step), cfg, full=full)
        report["curve"].append({"step": step, **{k: v for k, v in metrics_of[step].items()
                                                  if not k.startswith("dense_shape") and not k.endswith("_probe")}})
    for role, step in (("early", EARLY_STEP), ("late", cfg.total_steps)):
        saved = save_checked(hub.export_official(teacher(step)), WEIGHTS / f"{NAMES[role]}.pth")
        report["weights"][role] = {"file": saved["file"], "step": step, "dtype": "float32", "bytes": saved["bytes"],
                                   "sha256": saved["sha256"], "metrics": metrics_of[step]}
    # The last checkpoint's student, teacher (heads included) and centring state, without the optimiser:
    # chapter 9 continues training from it (train(..., continue_from=...)) with Gram anchoring.
    state = weights_only_state(torch.load(kept[cfg.total_steps], map_location="cpu", weights_only=False))
    saved = save_checked(state, WEIGHTS / f"{STATE_NAME}.pth")
    report["training_state"] = {"file": saved["file"], "step": cfg.total_steps, "dtype": "float32",
                                "bytes": saved["bytes"], "sha256": saved["sha256"],
                                "holds": "student, teacher (backbone and heads), centring state, config; no optimiser"}
    report["measure_seconds"] = round(time.perf_counter() - tic, 1)
    update_reference(report)
    print(json.dumps({role: w["metrics"] for role, w in report["weights"].items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
