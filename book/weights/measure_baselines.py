"""Baselines for the first reference models, measured without retraining them: chance, the majority class, raw
pixels, and a linear probe of each network beside its kNN.

    .venv/bin/python book/weights/measure_baselines.py      # seconds; rewrites only the fields below

- The shapes models (make_reference.py), on the kNN protocol of reference.json's "eval" (the run's own
  `knn_datasets`: 1,000 training shapes as memory, 500 held-out queries, 12 classes):
  "baselines" gains chance_top1, majority_top1 and raw_pixels.{knn_top1, linear_top1}; "random_init" and each
  "weights.<role>.metrics" gain linear_top1 (`dinolite.eval.linear_probe` on [CLS]).
- The distillation teacher (make_distill_teacher.py), on `texture_scores`' protocol (1,000 training and 500
  held-out textures, 12 classes; 300 / 200 TextureMosaics at 32 px for the dense probe): "distill_teacher" gains
  chance_top1 and baselines.{majority, raw_pixels} with kNN, linear and dense numbers.
Raw pixels: the flattened image for kNN and the linear probe, the flattened 8 x 8 (or patch-size) cells for the
dense probe (`dinolite.eval.patchify`).
"""
import json
import sys

import torch
from weights_helper import REFERENCE, WEIGHTS


def classification(train_x, train_y, test_x, test_y, num_classes: int) -> dict:
    from dinolite.eval import knn_classify, linear_probe

    knn = knn_classify(train_x, train_y, test_x, test_y, k=20)["top1"]
    linear = linear_probe(train_x, train_y, test_x, test_y, num_classes=num_classes)["top1"]
    return {"knn_top1": round(float(knn), 2), "linear_top1": round(float(linear), 2)}


def stacked(data) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [N, 3, H, W], labels [N] or masks [N, H, W]) of a dataset of (image, label) or (image, label, mask)."""
    items = [data[i] for i in range(len(data))]
    return torch.stack([it[0] for it in items]), torch.stack([torch.as_tensor(it[-1]) for it in items])


def majority_top1(train_y, test_y) -> float:
    return round(100 * (test_y == torch.bincount(train_y).argmax()).float().mean().item(), 2)


def shapes(reference: dict) -> None:
    from dinolite import hub
    from dinolite.data import SyntheticShapes, build_dataset
    from dinolite.eval import extract_features, linear_probe
    from dinolite.train.config import config_from_dict
    from dinolite.train.meta_arch import build_backbone
    from dinolite.train.run import knn_datasets

    cfg = config_from_dict(reference["config"])
    train_set, test_set = knn_datasets(build_dataset("builtin:n=10000,size=32"), cfg)
    (x, y), (xt, yt) = stacked(train_set), stacked(test_set)
    images, labels = {"train": x, "test": xt}, {"train": y, "test": yt}
    n = SyntheticShapes.num_classes
    pixels = classification(images["train"].flatten(1), labels["train"], images["test"].flatten(1), labels["test"], n)
    reference["baselines"].update(chance_top1=round(100 / n, 2), majority_top1=majority_top1(labels["train"], labels["test"]),
                                  raw_pixels={**reference["baselines"]["raw_pixels"], **pixels})
    torch.manual_seed(cfg.train.seed)
    networks = {"random_init": (build_backbone(cfg), reference["random_init"])}
    for role, entry in reference["weights"].items():
        state = torch.load(WEIGHTS / entry["file"], map_location="cpu", weights_only=True)
        networks[role] = (hub.load_official(build_backbone(cfg), state), entry["metrics"])
    for name, (backbone, record) in networks.items():
        backbone.eval()
        feats = {split: extract_features(backbone, images[split], progress=False)["cls"] for split in images}
        record["linear_top1"] = round(float(linear_probe(feats["train"], labels["train"], feats["test"], labels["test"],
                                                         num_classes=n)["top1"]), 2)
        print(f"shapes {name}: kNN {record['knn_top1']}, linear {record['linear_top1']}", flush=True)
    print("shapes baselines:", {k: v for k, v in reference["baselines"].items() if k != "majority"})


def textures(reference: dict) -> None:
    from dinolite.data import EvalTransform, SyntheticTextures, TextureMosaics
    from dinolite.eval import dense_probe, majority_baseline, patchify

    entry, transform = reference["distill_teacher"], EvalTransform(None, None)
    x, y = stacked(SyntheticTextures(1000, 32, seed=100, transform=transform))  # texture_scores' sets
    xt, yt = stacked(SyntheticTextures(500, 32, seed=200, transform=transform))
    n = SyntheticTextures.num_classes
    pixels = classification(x.flatten(1), y, xt.flatten(1), yt, n)
    (mx, my), (mxt, myt) = (stacked(TextureMosaics(k, 32, seed=s, transform=transform)) for k, s in ((300, 100), (200, 200)))
    patch = 8  # the teacher's patch size
    pixels["dense_miou"] = round(float(dense_probe(patchify(mx, patch), my, patchify(mxt, patch), myt, n)["miou"]), 2)
    entry["chance_top1"] = round(100 / n, 2)
    entry["baselines"] = {"raw_pixels": pixels, "majority": {
        "top1": majority_top1(y, yt), "dense_miou": round(float(majority_baseline(my, myt, n)["miou"]), 2)}}
    print("textures baselines:", entry["chance_top1"], entry["baselines"])


def main() -> int:
    torch.set_num_threads(1)
    reference = json.loads(REFERENCE.read_text())
    shapes(reference)
    textures(reference)
    REFERENCE.write_text(json.dumps(reference, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
