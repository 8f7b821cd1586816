"""Copy detection on planted copies of real photographs: the DEFAULT `python -m dinolite.curate`
against the DINO embedding, scored by edit type.

The pool (issue 24): 3,000 photographs, centre-cropped and resized to 32 x 32, plus 100 planted
copies for each edit of dinolite.copydetect.EDITS (JPEG quality 30, half-size down then up,
brightness x1.25, a 2-px border cropped and resized back, mirrored) of 500 distinct originals.
The photos are not shipped: point --photos at a folder of photographs (searched recursively for
.jpg/.jpeg/.png; we used the Imagenette training and validation JPEGs). Without --photos the pool
is built from scikit-image's bundled photos, cut into distinct 48-px tiles resized to 32 x 32 (the
second set, dinolite.data.photos.photo_tiles: 472 tiles; 32-px tiles hold little more than one
edge each and many distinct ones look alike: the descriptor's precision on them is 0.90).

    python benchmarks/copy_detection.py --photos ~/data/imagenette2 --work /tmp/copy
    python benchmarks/copy_detection.py --work /tmp/copy_skimage

Scores (the planted copies are the truth; an image is a copy of its original and of nothing else):
    recall of an edit: the share of its copies that end in the same duplicate group as their original;
    precision: the share of removed images whose group keeps an image they are a copy of
        (curation.duplicate_precision_recall); per edit: over the groups holding a copy of that edit.
The default command's groups are read back from its report.json (image paths, the kept one first).
The DINO embedding (the same run's embeddings.npy) is scored at DINOv2's 0.6, at 0.99, and at the
threshold `--dedup-threshold auto` picks for it.
"""
import argparse
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from dinolite import copydetect, curation
from dinolite.curate import main as curate_main
from dinolite.data.photos import photo_tiles

SIZE = 32


def centre_square(image: Image.Image, size: int = SIZE) -> Image.Image:
    """The largest centred square of `image`, resized to size x size (bicubic, antialiased)."""
    if hasattr(image, "draft"):
        image.draft("RGB", (3 * size, 3 * size))  # JPEG: decode at a reduced scale, much faster
    image = image.convert("RGB")
    w, h = image.size
    side = min(w, h)
    box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    return image.crop(box).resize((size, size), Image.BICUBIC, reducing_gap=None)


def photos_from_folder(folder, n: int, seed: int = 0) -> list:
    """n random photos of `folder` (recursive), each as a 32 x 32 centre square."""
    paths = sorted(p for p in Path(folder).expanduser().rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if len(paths) < n:
        raise SystemExit(f"error: {folder} holds {len(paths)} photos; the benchmark needs {n}")
    chosen = np.random.default_rng(seed).choice(len(paths), n, replace=False)
    out = []
    for i in chosen:
        with Image.open(paths[i]) as image:
            out.append(centre_square(image))
    return out


def write_pool(originals, per_edit: int, folder: Path, seed: int = 1):
    """originals + planted copies as PNG files in `folder`. Returns {path: (source, edit)}."""
    copies, source, edits = copydetect.plant_copies(originals, per_edit, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    truth = {}
    for i, image in enumerate(originals):
        path = folder / f"o{i:05d}.png"
        image.save(path)
        truth[str(path.resolve())] = (i, "original")
    for j, (image, src, edit) in enumerate(zip(copies, source, edits)):
        path = folder / f"c{j:04d}_{edit}.png"
        image.save(path)
        truth[str(path.resolve())] = (int(src), str(edit))
    return truth


def print_table(title: str, rows: dict) -> None:
    print(f"\n{title}")
    print(f"  {'edit':11s} {'recall':>7s} {'precision':>10s}")
    for name in copydetect.EDITS:
        print(f"  {name:11s} {rows[name]['recall']:7.2f} {rows[name]['precision']:10.2f}")
    a = rows["all"]
    print(f"  {'all':11s} {a['recall']:7.2f} {a['precision']:10.2f}   ({a['removed']} images removed)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", help="a folder of photographs (default: scikit-image's photos, tiled)")
    parser.add_argument("--work", required=True, help="where the pool and the curation output are written")
    parser.add_argument("--n", type=int, default=3000, help="photos in the pool (with --photos)")
    parser.add_argument("--per-edit", type=int, default=100, help="planted copies per edit")
    parser.add_argument("--checkpoint", help="a trained backbone whose [CLS] embedding is scored (default: the "
                        "command's default, a random tiny ViT)")
    parser.add_argument("--config", help="its recipe or YAML, as for python -m dinolite.curate")
    args = parser.parse_args()
    work = Path(args.work)
    originals = photos_from_folder(args.photos, args.n) if args.photos else photo_tiles()
    per_edit = min(args.per_edit, len(originals) // (2 * len(copydetect.EDITS)))
    truth = write_pool(originals, per_edit, work / "pool")
    print(f"pool: {len(originals)} photos + {per_edit * len(copydetect.EDITS)} planted copies "
          f"({per_edit} per edit) in {work / 'pool'}")

    out = work / "curated"
    target = len(originals) // 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-backbone warning: the default embedding, on purpose
        start = time.perf_counter()
        backbone_flags = (["--checkpoint", args.checkpoint] if args.checkpoint else []) \
            + (["--config", args.config] if args.config else [])
        code = curate_main(["--data", f"folder:{work / 'pool'}", "--output-dir", str(out), "--target", str(target)]
                           + backbone_flags)
        wall = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"the default command failed (exit {code})")
    report = json.loads((out / "report.json").read_text())
    paths = sorted(truth)  # folder: lists files sorted, as build_dataset does
    index = {p: i for i, p in enumerate(paths)}
    source = np.array([truth[p][0] for p in paths])
    edit = np.array([truth[p][1] for p in paths])
    groups = [np.array([index[p] for p in g]) for g in report["duplicates"]["groups"]]
    default = copydetect.score_by_edit(groups, source, edit)
    print_table(f"DEFAULT command (copy descriptor, threshold {report['duplicates']['threshold']}, "
                f"{report['duplicates']['threshold_from']}):", default)
    n_images = len(paths)
    t = report["timings"]
    print(f"\ntimes per 1,000 images: embedding ({report['backbone']}) {1000 * t['embed_s'] / n_images:.2f} s, "
          f"copy descriptor {1000 * t['describe_s'] / n_images:.2f} s; whole command {wall:.0f} s")

    # how copydetect.DEFAULT_THRESHOLD was calibrated: copydetect.calibrate on the photos alone
    photo_views = copydetect.describe_views(copydetect.thumbnails(originals, progress=False))
    c = copydetect.calibrate(originals, photo_views, lambda ims: copydetect.describe_views(
        copydetect.thumbnails(ims, progress=False)))
    print(f"\ncalibration of the descriptor on the {len(originals)} photos: {c['planted']} planted copies >= "
          f"{c['copies_low']:.4f} (1st percentile), {c['sampled']} photos' closest other photo <= "
          f"{c['distinct_high']:.4f} (99.5th percentile): threshold {c['threshold']:.4f} "
          f"(copies found {c['copies_found']:.3f}, photos linked {c['distinct_linked']:.3f})")

    emb = np.load(out / "embeddings.npy")
    views = [emb]
    images = [Image.open(p).convert("RGB") for p in paths]
    from dinolite.curate import load_backbone

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone, cfg, name = load_backbone(args.checkpoint, args.config, 0)
    calibration = copydetect.calibrate(images, views, lambda ims: [curation.embed(
        ims, backbone, image_size=cfg.crops.global_size, progress=False)])
    results = {"default": default, "descriptor_calibration": c, "timings_per_1000": {"embed_s": 1000 * t["embed_s"] / n_images,
                                                        "describe_s": 1000 * t["describe_s"] / n_images}}
    for tau in (0.6, 0.99, round(calibration["threshold"], 4)):
        _, emb_groups = curation.find_duplicates(emb, threshold=tau, k=64)
        rows = copydetect.score_by_edit(emb_groups, source, edit)
        results[f"embedding@{tau}"] = rows
        print_table(f"DINO embedding ({name}), threshold {tau}"
                    + (" (auto)" if tau == round(calibration["threshold"], 4) else "") + ":", rows)
    (work / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
