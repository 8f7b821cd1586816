"""Make the photo reference models in book/weights/: the small-photos recipe's teachers trained on real
photographs (Imagenette at 32 px, 5,016 steps of batch 32, one thread each), fp16, with their measurements.

    python benchmarks/prepare_photos.py                 # once: Imagenette at 32 and 64 px under ~/data/photos
    python book/weights/make_photo_reference.py         # train the missing seeds (resumable), export, measure

1. Trains each seed of SEEDS with benchmarks/ablate_photos.py (the command is recorded in reference.json; a
   seed whose result line is already in --out is skipped, so re-running resumes). ablate_photos saves each
   run's trained teacher backbone (fp16) to teachers/ beside --out.
2. Exports each teacher in the official key layout (`dinolite.hub.export_official`, fp16) to
   book/weights/photos32_seed<N>.pth.
3. Measures each teacher and the same network at initialisation (`torch.manual_seed(seed)` then
   `build_backbone`, as the run starts; its kNN must equal the run's recorded initial kNN):
   - on Imagenette's held-out split (3,925 photos, 10 classes): the weighted kNN of ablate_photos
     (k 20, T 0.07, [CLS]), which must equal the run's recorded kNN, and `dinolite.eval.linear_probe` on [CLS];
     the raw-pixel and majority-class baselines;
   - on `dinolite.data.PhotoMosaics` (ships with the book: scikit-image's photos): `dinolite.eval.dense_probe`
     on the patch tokens at DENSE's image size, against raw patch pixels and the majority class.
   and writes everything under reference.json's "photos" entry. tests/test_reference_weights.py re-checks the
   hashes and one dense number; chapter 8 re-measures the dense probe on the page.
"""
import argparse
import functools
import json
import os
import subprocess
import sys
import time

import torch
from weights_helper import ROOT, WEIGHTS, save_checked, update_reference

DATA = "folder:~/data/photos/imagenette32"
OUT = "~/data/photos/reference.jsonl"  # ablate_photos' results (appended); the teachers go to teachers/ beside it
ROW, STEPS, CURVE_EVERY = "lr0.003", 5016, 627  # ablate_photos' row for the small-photos recipe
SEEDS = (0, 1, 2)
# The dense task the chapter re-measures: PhotoMosaics at 64 px (an 8 x 8 patch grid), train and held-out splits.
DENSE = {"image_size": 64, "train_images": 300, "test_images": 200, "seed": 0}


def ablate_command(seeds) -> list[str]:
    return [sys.executable, "benchmarks/ablate_photos.py", "--rows", ROW, "--seeds", *map(str, seeds),
            "--steps", str(STEPS), "--curve-every", str(CURVE_EVERY), "--jobs", "1", "--data", DATA, "--out", OUT]


def recorded_run(seed: int) -> dict:
    """ablate_photos' result line of this seed (kNN at init and end, curve, time per step)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import ablate_photos

    lines = [r for r in ablate_photos.load_results(os.path.expanduser(OUT))
             if r["row"] == ROW and r.get("seed") == seed and r.get("steps") == STEPS
             and ablate_photos.set_name(r["data"]) == ablate_photos.set_name(DATA)]
    if not lines:
        raise SystemExit(f"no {ROW} seed {seed} result in {OUT}; run without --skip-train")
    return lines[-1]


@functools.lru_cache(maxsize=None)  # the same mosaics for every model measured: generate them once
def dense_data(split: str):
    from dinolite.data import EvalTransform, PhotoMosaics

    n = DENSE["train_images"] if split == "train" else DENSE["test_images"]
    data = PhotoMosaics(n, DENSE["image_size"], split, seed=DENSE["seed"], transform=EvalTransform(None, None))
    images, _, masks = zip(*(data[i] for i in range(len(data))))
    return torch.stack(images), torch.stack(masks)


def dense_scores(features_of) -> dict:
    """dense_probe mIoU (and per-photo IoU) on PhotoMosaics of features_of(images) -> [N, h, w, D]."""
    from dinolite.data import PhotoMosaics
    from dinolite.eval import dense_probe

    (x, y), (xt, yt) = dense_data("train"), dense_data("held-out")
    with torch.no_grad():
        features, test_features = features_of(x), features_of(xt)
    r = dense_probe(features, y, test_features, yt, PhotoMosaics.num_classes)
    return {"miou": round(r["miou"], 2), "iou": [round(100 * v, 2) for v in r["iou"].tolist()],
            "probe": {"lr": r["lr"], "class_weights": r["class_weights"]}}


def patch_tokens(backbone):
    from dinolite.eval import extract_features

    return lambda images: extract_features(backbone, images, patch_tokens=True, progress=False)["patch"]


def classification(features_of, sets) -> dict:
    """Weighted kNN (ablate_photos' own) and a linear probe on the [CLS] features of Imagenette."""
    import vs_lightly
    from dinolite.data import EvalTransform
    from dinolite.eval import linear_probe

    train_images, train_labels, test_images, test_labels = sets[DATA]
    transform = EvalTransform(resize_size=None, crop_size=None)
    with torch.no_grad():
        knn = vs_lightly.knn_top1(features_of, sets)[DATA]
        feats = [torch.cat([features_of(chunk) for chunk in torch.stack([transform(im) for im in images]).split(256)])
                 for images in (train_images, test_images)]
    linear = linear_probe(feats[0].float(), train_labels, feats[1].float(), test_labels, num_classes=10)
    return {"knn_top1": round(knn, 2), "linear_top1": round(linear["top1"], 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-train", action="store_true", help="use the recorded runs and teachers as they are")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    torch.set_num_threads(1)
    if not args.skip_train:
        subprocess.run(ablate_command(args.seeds), check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import ablate_photos
    import vs_lightly
    from dinolite import hub
    from dinolite.eval import majority_baseline, patchify
    from dinolite.train.config import config_to_dict
    from dinolite.train.meta_arch import build_backbone

    cfg = vs_lightly.dinolite_config(ablate_photos.run_args(ROW, args.seeds[0], STEPS, DATA))
    sets = {DATA: vs_lightly.labelled_set(DATA, cfg.crops.global_size)}
    teachers = os.path.join(os.path.dirname(os.path.expanduser(OUT)), "teachers")
    tic = time.perf_counter()
    models = {}
    for seed in args.seeds:
        run = recorded_run(seed)
        state = torch.load(os.path.join(teachers, f"{ablate_photos.set_name(DATA)}_{ROW}_seed{seed}_{STEPS}.pth"),
                           map_location="cpu", weights_only=True)
        trained = build_backbone(cfg)
        trained.load_state_dict({k: v.float() for k, v in state.items()})
        torch.manual_seed(seed)
        initial = build_backbone(cfg)  # as DinoliteSide starts: seed, then the student backbone first
        entry = {"seed": seed, "recorded": {k: run[k] for k in ("knn_init", "knn_end", "cpu_s_per_step", "finished")}}
        for name, backbone in (("init", initial), ("trained", trained)):
            backbone.eval()
            scores = classification(backbone, sets)
            scores["dense"] = dense_scores(patch_tokens(backbone))
            entry[name] = scores
            print(f"seed {seed} {name}: {scores['knn_top1']} kNN, {scores['linear_top1']} linear, "
                  f"{scores['dense']['miou']} dense mIoU", flush=True)
        for name, key in (("init", "knn_init"), ("trained", "knn_end")):  # the same network the run measured
            if abs(entry[name]["knn_top1"] - run[key]) > 0.1:  # fp16 storage flips a few of 3,925 queries
                raise SystemExit(f"seed {seed}: {name} kNN {entry[name]['knn_top1']} differs from the recorded "
                                 f"{run[key]:.2f}: the teacher or the initialisation is not the run's")
        path = WEIGHTS / f"photos32_seed{seed}.pth"
        entry.update(save_checked({k: v.half() for k, v in hub.export_official(trained).items()}, path))
        models[f"seed{seed}"] = entry

    # baselines: raw pixels and the majority class
    pixels = classification(lambda images: images.flatten(1), sets)
    train_labels, test_labels = sets[DATA][1], sets[DATA][3]
    majority = (test_labels == torch.bincount(train_labels).argmax()).float().mean().item() * 100
    (x, y), (xt, yt) = dense_data("train"), dense_data("held-out")
    from dinolite.data import PhotoMosaics

    baselines = {
        "chance": round(100 / 10, 2),
        "raw_pixels": {**pixels, "dense": dense_scores(lambda images: patchify(images, cfg.model.patch_size))},
        "majority": {"top1": round(majority, 2),
                     "dense": {"miou": round(majority_baseline(y, yt, PhotoMosaics.num_classes)["miou"], 2)}},
    }
    command = " ".join(["OMP_NUM_THREADS=1 python"] + ablate_command(args.seeds)[1:])
    update_reference({"photos": {
        "about": "Reference models that learned from real photographs: the small-photos recipe's teacher backbones "
                 "(dinolite), one per training seed, made by book/weights/make_photo_reference.py. Files hold "
                 "dinolite.hub.export_official(backbone) in fp16.",
        "training_data": "Imagenette (10 ImageNet classes) at 32 px, train split: 9,469 photos; kNN and linear "
                         "probe on its val split (3,925 photos). The photos are not in this repository.",
        "command": command, "recipe": "small-photos", "steps": STEPS, "config": config_to_dict(cfg),
        "dense_eval": {**DENSE, "data": "dinolite.data.PhotoMosaics (scikit-image's photos; train vs held-out "
                       "columns)", "num_classes": PhotoMosaics.num_classes},
        "baselines": baselines, "models": models,
        "measure_seconds": round(time.perf_counter() - tic, 1),
    }})
    print(json.dumps(baselines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
