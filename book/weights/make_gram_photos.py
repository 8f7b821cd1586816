"""Make chapter 9's photo evidence: does the small-photos recipe's dense quality fall late in training, and
what does Gram anchoring do to it? Three seeds, all runs on Imagenette at 32 px (one thread each).

    python benchmarks/prepare_photos.py          # once: Imagenette under ~/data/photos
    python book/weights/make_gram_photos.py      # train what is missing (resumable), measure, export

1. Base runs: `small-photos` for 8 epochs of 627 steps (5,016 steps of batch 32: the recipe of the photo
   reference models, which ship as photos32_seed<N>.pth), a checkpoint every epoch.
2. Continued runs, from each base run's last checkpoint, 2 more epochs (1,254 steps) at a constant lr of 0.6x the
   recipe's peak and teacher momentum 0.999 (as DINOv3's 7B Gram stage: CONTINUED_BASE_LR), weight decay on the
   cosine of a 10-epoch run, in two arms that differ only in the Gram term:
   - control: no Gram loss;
   - anchored: the Gram loss against the run's own teacher at step ANCHOR_STEP (3,135: the middle of the dense
     plateau of seed 0's base run), weight 1 after a cosine ramp over a fifth of an epoch, local-crop DINO
     weight 0.5 while it is on, the anchor seeing the same crops at the same size (gram.teacher_scale=1: the
     photos are 32 px, so a larger view adds no detail).
3. Measures every checkpoint's teacher backbone (and the initialisation, rebuilt from the seed):
   - kNN top-1 on Imagenette's held-out split (3,925 photos; ablate_photos' weighted kNN, k 20 on [CLS]);
   - `dinolite.eval.dense_probe` mIoU on `dinolite.data.PhotoMosaics` (make_photo_reference's protocol);
   - the within-image patch-similarity agreement (ROC AUC, chapter 9) on the held-out mosaics;
   - the mean cosine between each patch token and the image's [CLS] token on the held-out mosaics.
4. Exports, per seed, the anchor and both continued runs' end teachers (fp16, official layout) to
   gram_photos_seed<N>_{anchor,control,anchored}.pth, checks that the base run's end teacher is the shipped
   photos32_seed<N>.pth, and writes reference.json's "gram_photos" entry.
"""
import argparse
import json
import os
import sys
import time

import torch
from weights_helper import WEIGHTS, command_line, save_checked, train, update_reference

RUNS = os.path.expanduser("~/data/gram")
DATA = "folder:~/data/photos/imagenette32/train"
EVAL = "folder:~/data/photos/imagenette32"  # its val split is the held-out set (make_photo_reference's DATA)
SEEDS = (0, 1, 2)
EPOCH, BASE_EPOCHS, MORE_EPOCHS = 627, 8, 2
ANCHOR_STEP = 5 * EPOCH  # 3,135
# DINOv3's 7B Gram stage runs at a constant lr, 0.6x its pre-training lr (2.4e-4 against 4e-4 at batch 4096, both
# constant): the continued runs use 0.6x small-photos' base lr 0.003, constant.
CONTINUED_BASE_LR = 0.6 * 0.003
COMMON = [f"train.epoch_length={EPOCH}", f"train.checkpoint_every={EPOCH}", "train.keep_last=100",
          "train.knn_every=0", "train.monitor_every=0", "train.log_every=100", "train.progress=false",
          "train.num_workers=0"]
GRAM = ["gram.weight=1.0", f"gram.start_epoch={BASE_EPOCHS}", "gram.warmup_epochs=0.2", "gram.teacher_scale=1.0",
        "gram.local_dino_weight=0.5", f"gram.teacher_step={ANCHOR_STEP}"]


def run_dir(name: str, seed: int) -> str:
    return os.path.join(RUNS, f"{name}_s{seed}")


def base_args(seed: int) -> list[str]:
    return ["--config", "small-photos", "--data", DATA, "--output-dir", run_dir("base", seed),
            f"train.epochs={BASE_EPOCHS}", *COMMON, f"train.seed={seed}"]


def continue_args(arm: str, seed: int) -> list[str]:
    gram = [*GRAM, f"gram.teacher={run_dir('base', seed)}"] if arm == "anchored" else ["gram.weight=0"]
    return ["--config", "small-photos", "--data", DATA, "--output-dir", run_dir(arm, seed),
            "--continue-from", run_dir("base", seed), f"train.epochs={BASE_EPOCHS + MORE_EPOCHS}", *COMMON,
            f"train.seed={seed}", "optim.momentum_teacher=0.999", "optim.final_momentum_teacher=0.999",
            "optim.lr_schedule=constant", f"optim.base_lr={CONTINUED_BASE_LR}", *gram]


def teacher_backbone(cfg, checkpoint_path: str):
    """The EMA teacher's backbone of a dinolite checkpoint (hub.load_official reads {"teacher": {"backbone.*"}})."""
    from dinolite import hub
    from dinolite.checkpoint import load_checkpoint
    from dinolite.train.meta_arch import build_backbone

    return hub.load_official(build_backbone(cfg), load_checkpoint(checkpoint_path)).eval()


def patch_cls_cosine(backbone) -> float:
    """Mean cosine between each patch token and its image's [CLS] token, on the held-out mosaics."""
    import torch.nn.functional as F
    from make_photo_reference import dense_data

    with torch.no_grad():
        out = backbone.forward_features(dense_data("held-out")[0])
    cls = F.normalize(out["x_norm_clstoken"], dim=-1)
    patches = F.normalize(out["x_norm_patchtokens"], dim=-1)
    return (patches @ cls.unsqueeze(-1)).mean().item()


def patch_agreement(backbone) -> float:
    """Within-image patch-similarity agreement (ROC AUC, chapter 9) on the held-out mosaics: does the cosine of two
    patches of one mosaic tell whether they show the same photo? Nothing is fitted."""
    from dinolite.data import PhotoMosaics
    from dinolite.eval import patch_similarity_agreement
    from make_photo_reference import dense_data, patch_tokens

    images, masks = dense_data("held-out")
    with torch.no_grad():
        patches = patch_tokens(backbone)(images)
    return patch_similarity_agreement(patches, masks, PhotoMosaics.num_classes)["auc"]


def measure(backbone, sets) -> dict:
    import vs_lightly
    from make_photo_reference import dense_scores, patch_tokens

    backbone.eval()
    with torch.no_grad():
        knn = vs_lightly.knn_top1(backbone, sets)[EVAL]
    return {"knn_top1": round(knn, 2), "dense_miou": dense_scores(patch_tokens(backbone))["miou"],
            "patch_agreement_auc": round(patch_agreement(backbone), 4),
            "patch_cls_cos": round(patch_cls_cosine(backbone), 4)}


def curve(cfg, run: str, sets, seed: int | None = None) -> list[dict]:
    """Measurements of every checkpoint of run (and of the initialisation when seed is given)."""
    from dinolite.checkpoint import list_checkpoints
    from dinolite.train.meta_arch import build_backbone

    cache_file = os.path.join(run, "measured.json")  # measurements already made (a re-run measures only new ones)
    cache = {int(k): v for k, v in json.load(open(cache_file)).items()} if os.path.exists(cache_file) else {}
    todo = [(step, path) for step, path in list_checkpoints(run)] + ([(0, None)] if seed is not None else [])
    for step, path in sorted(todo):
        if step not in cache:
            if path is None:
                torch.manual_seed(seed)  # as the run starts: the seed, then the student backbone first
            cache[step] = measure(build_backbone(cfg) if path is None else teacher_backbone(cfg, path), sets)
            print(os.path.basename(run), step, cache[step], flush=True)
            with open(cache_file, "w") as f:
                json.dump(cache, f)
    return [{"step": step, **cache[step]} for step, _ in sorted(todo)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-train", action="store_true", help="measure the runs as they are")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    args = parser.parse_args(argv)
    for seed in args.seeds:
        train(base_args(seed), skip=args.skip_train)
        for arm in ("control", "anchored"):
            train(continue_args(arm, seed), skip=args.skip_train)

    sys.path.insert(0, str(WEIGHTS.parents[1] / "benchmarks"))
    import vs_lightly
    from dinolite import hub
    from dinolite.checkpoint import list_checkpoints
    from dinolite.train.config import config_to_dict, load_config
    from dinolite.train.meta_arch import build_backbone

    cfg = load_config(os.path.join(run_dir("base", args.seeds[0]), "config.yaml"))
    sets = {EVAL: vs_lightly.labelled_set(EVAL, cfg.crops.global_size)}
    tic = time.perf_counter()
    seeds = {}
    for seed in args.seeds:
        entry = {"base": curve(cfg, run_dir("base", seed), sets, seed)}
        for arm in ("control", "anchored"):
            entry[arm] = curve(cfg, run_dir(arm, seed), sets)
        checkpoints = {arm: dict(list_checkpoints(run_dir(arm, seed))) for arm in ("base", "control", "anchored")}
        end = max(checkpoints["base"])
        shipped = torch.load(WEIGHTS / f"photos32_seed{seed}.pth", weights_only=True)
        exported = hub.export_official(teacher_backbone(cfg, checkpoints["base"][end]))
        if any(not torch.equal(exported[k].half(), v) for k, v in shipped.items()):
            raise SystemExit(f"seed {seed}: the base run's end teacher is not photos32_seed{seed}.pth")
        entry["weights"] = {}
        for role, arm, step in (("anchor", "base", ANCHOR_STEP), ("control", "control", None),
                                ("anchored", "anchored", None)):
            step = step or max(checkpoints[arm])
            backbone = teacher_backbone(cfg, checkpoints[arm][step])
            state = {k: v.half() for k, v in hub.export_official(backbone).items()}
            path = WEIGHTS / f"gram_photos_seed{seed}_{role}.pth"
            entry["weights"][role] = {"step": step, **save_checked(state, path)}
        seeds[f"seed{seed}"] = entry
    update_reference({"gram_photos": {
        "about": "Chapter 9 on photographs (book/weights/make_gram_photos.py): the small-photos recipe measured at "
                 "every epoch over 5,016 steps, then continued 1,254 steps without (control) and with (anchored) "
                 "the Gram loss against its step-3,135 teacher. Teacher backbones measured; files hold "
                 "dinolite.hub.export_official(backbone) in fp16.",
        "commands": {name: command_line(args).replace(os.path.expanduser("~"), "~") for name, args in
                     (("base", base_args(0)), ("control", continue_args("control", 0)),
                      ("anchored", continue_args("anchored", 0)))},
        "config": config_to_dict(cfg), "anchor_step": ANCHOR_STEP, "base_steps": BASE_EPOCHS * EPOCH,
        "continued_steps": MORE_EPOCHS * EPOCH, "eval": {"knn": "Imagenette 32 px val (3,925 photos, 10 classes)",
                                                          "dense": "make_photo_reference.DENSE"},
        "seeds": seeds, "measure_seconds": round(time.perf_counter() - tic, 1),
    }})
    return 0


if __name__ == "__main__":
    sys.exit(main())
