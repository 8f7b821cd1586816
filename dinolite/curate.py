"""Command line: python -m dinolite.curate --data SPEC [--seed-images SPEC] --output-dir DIR --target N [options]

Curates an image pool the way LVD-142M / LVD-1689M were built, at small scale:
  1. embed every pool image (L2-normalised [CLS] of a backbone) into DIR/embeddings.npy;
  2. with --exclude: drop pool images that are copies of a held-out evaluation set;
  3. copy detection: drop all but one image of each group of near-duplicates, found with a copy
     descriptor (dinolite.copydetect; not the DINO embedding, which ignores crops and colour);
  4. with --seed-images: keep the --retrieve-k nearest pool images of every seed image;
  5. hierarchical k-means of the rest and a balanced sample that fills the target.
Writes DIR/curated.txt (PATH<TAB>LABEL per line: train on it with --data list:DIR/curated.txt),
DIR/report.json (counts, every duplicate group as image paths, the kept one first, and the
excluded images) and DIR/duplicates.png (a contact sheet of the largest and of random groups:
check it). Images of datasets without files (textures, builtin, torchvision) are written to
DIR/images/ as PNG first.

Example:
    python -m dinolite.curate --data folder:~/photos --checkpoint runs/tiny/teacher_backbone_official.pth \
        --output-dir runs/curated --target 5000
"""
import argparse
import json
import os
import sys
import time
import warnings

import numpy as np
import torch

from dinolite import copydetect, curation


def build_parser() -> argparse.ArgumentParser:
    from dinolite.data import DATA_SPEC_FORMS

    parser = argparse.ArgumentParser(prog="python -m dinolite.curate", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="data specs:\n  " + "\n  ".join(DATA_SPEC_FORMS))
    parser.add_argument("--data", required=True, help="the uncurated pool (a data spec)")
    parser.add_argument("--seed-images", help="a curated seed set (a data spec); its nearest pool images are kept")
    parser.add_argument("--seed", help=argparse.SUPPRESS)  # renamed --seed-images: a clear error, not a guess
    parser.add_argument("--output-dir", required=True, help="embeddings.npy, curated.txt, report.json (and images/)")
    parser.add_argument("--target", type=int, required=True, help="number of images in the curated list")
    parser.add_argument("--checkpoint", help="a dinolite training checkpoint (checkpoint_*.pth) or an official-layout "
                        "backbone file (teacher_backbone_official.pth); default: a random tiny ViT (with a warning)")
    parser.add_argument("--config", help="recipe or YAML describing the backbone of an official-layout file "
                        "(default: config.yaml beside it; tiny-cpu without --checkpoint)")
    parser.add_argument("--image-size", type=int, help="embedding resolution (default: the recipe's global crop size)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--copy-detector", choices=("descriptor", "embedding"), default="descriptor",
                        help="what copy detection compares: the copy descriptor of dinolite.copydetect (default) "
                        "or the backbone's [CLS] embedding (blind to crops and colour changes; chapter 12)")
    parser.add_argument("--dedup-threshold", default=None,
                        help="similarity at which two images are copies, or 'auto': plant copies of a sample of the "
                        f"pool and pick it (default: {copydetect.DEFAULT_THRESHOLD} for the descriptor, calibrated "
                        "on planted copies of photos; auto for the embedding)")
    parser.add_argument("--dedup-k", type=int, default=64, help="neighbours per image in copy detection (DINOv2: 64)")
    parser.add_argument("--max-removed", type=float, default=0.5,
                        help="stop when copy detection would remove more than this share of the pool")
    parser.add_argument("--exclude", help="a held-out evaluation set (a data spec): pool images that are copies of "
                        "its images are removed (decontamination)")
    parser.add_argument("--retrieve-k", type=int, default=4, help="pool images kept per seed image (DINOv2: 4)")
    parser.add_argument("--levels", help="clusters per k-means level, finest first, e.g. 100,20 "
                        "(default: N/20 and N/100 of the deduplicated pool)")
    parser.add_argument("--resampling-steps", type=int, default=2)
    parser.add_argument("--strategy", choices=("closest", "random"), default="closest",
                        help="which images a leaf cluster gives: closest to its centroid, or random")
    parser.add_argument("--random-seed", type=int, default=0)
    return parser


def load_backbone(checkpoint: str | None, config: str | None, seed: int = 0):
    """(backbone in eval mode, its Config, a description). Loading is strict (dinolite.hub.load_official)."""
    from dinolite.hub import load_official
    from dinolite.train.config import config_from_dict
    from dinolite.train.recipes import get_config
    from dinolite.train.meta_arch import build_backbone

    if checkpoint is None:
        warnings.warn("no --checkpoint: embedding with a randomly initialised ViT, whose neighbours follow pixel "
                      "statistics rather than learned features; pass a trained backbone for real curation",
                      stacklevel=2)
        cfg = get_config(config or "tiny-cpu")
        torch.manual_seed(seed)
        return build_backbone(cfg).eval(), cfg, f"random init ({config or 'tiny-cpu'})"
    if not os.path.isfile(checkpoint):
        raise ValueError(f"checkpoint {checkpoint} does not exist")
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {checkpoint}: {str(e).splitlines()[0]}") from None
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {checkpoint} holds a {type(state).__name__}, not a state dict")
    if "config" in state and config is None:
        cfg = config_from_dict(state["config"])
    else:
        beside = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "config.yaml")
        if config is None and not os.path.isfile(beside):
            raise ValueError(f"{checkpoint} holds weights but no config, and there is no config.yaml beside it; "
                             "pass --config with the recipe or YAML it was trained with")
        cfg = get_config(config or beside)
    backbone = build_backbone(cfg)
    load_official(backbone, state)
    return backbone.eval(), cfg, f"{checkpoint}"


def _levels(spec: str | None, n: int) -> list[int]:
    if spec is None:
        return [max(2, n // 20), max(2, n // 100)] if n >= 200 else [max(1, n // 10)]
    try:
        levels = [int(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--levels must be integers separated by commas, e.g. 100,20; got {spec!r}") from None
    if not levels or min(levels) < 1:
        raise ValueError(f"--levels needs positive cluster counts, e.g. 100,20; got {spec!r}")
    return levels


def _image_paths(dataset, indices, output_dir):
    """(path, label) of the chosen images: their files, or PNG copies under output_dir/images/."""
    if _has_files(dataset):
        return [(os.path.abspath(dataset.samples[i][0]), int(dataset.samples[i][1])) for i in indices]
    folder = os.path.join(output_dir, "images")
    os.makedirs(folder, exist_ok=True)
    out = []
    for i in indices:
        item = dataset[int(i)]
        image, label = (item[0], item[1]) if isinstance(item, (tuple, list)) else (item, -1)
        path = os.path.join(folder, f"{int(i):08d}.png")
        image.save(path)
        out.append((path, int(label)))
    return out


def _has_files(dataset) -> bool:
    return hasattr(dataset, "samples") and all(hasattr(s[0], "is_file") for s in dataset.samples[:1])


def _names(dataset, spec, indices) -> list[str]:
    """How the report names pool images: their file paths, or SPEC#INDEX for datasets without files."""
    if _has_files(dataset):
        return [os.path.abspath(dataset.samples[int(i)][0]) for i in indices]
    return [f"{spec}#{int(i)}" for i in indices]


def _threshold(value, detector: str):
    """--dedup-threshold -> a float, or "auto"; default: the descriptor's calibrated value, auto for embeddings."""
    if value is None:
        return copydetect.DEFAULT_THRESHOLD if detector == "descriptor" else "auto"
    if value == "auto":
        return value
    try:
        threshold = float(value)
    except ValueError:
        raise ValueError(f"--dedup-threshold must be a number in [-1, 1] or 'auto', got {value!r}") from None
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"--dedup-threshold is a cosine similarity and must be in [-1, 1], got {threshold}")
    return threshold


def _image(item):
    return item[0] if isinstance(item, (tuple, list)) else item


def curate(args) -> dict:
    """The pipeline behind the command line; returns the report (also written to report.json)."""
    from dinolite.data import build_dataset

    timings = {}
    tic = time.perf_counter()
    if args.seed is not None:
        raise ValueError("--seed was renamed --seed-images (a dataset of seed images); the random seed is --random-seed")
    if args.target < 1:
        raise ValueError(f"--target must be >= 1, got {args.target}")
    if not 0 < args.max_removed <= 1:
        raise ValueError(f"--max-removed is a share of the pool in (0, 1], got {args.max_removed}")
    threshold = _threshold(args.dedup_threshold, args.copy_detector)
    if args.levels:
        _levels(args.levels, 0)  # a malformed --levels fails before the (slow) embedding
    pool = build_dataset(args.data)
    if len(pool) == 0:
        raise ValueError(f"the pool {args.data} is empty")
    if args.target > len(pool):
        raise ValueError(f"--target {args.target} is larger than the pool ({len(pool)} images in {args.data})")
    excluded_set = build_dataset(args.exclude) if args.exclude else None  # a bad spec fails before the embedding
    backbone, cfg, backbone_name = load_backbone(args.checkpoint, args.config, args.random_seed)
    size = args.image_size or cfg.crops.global_size
    os.makedirs(args.output_dir, exist_ok=True)
    emb = curation.embed(pool, backbone, image_size=size, batch_size=args.batch_size,
                         output=os.path.join(args.output_dir, "embeddings.npy"))
    timings["embed_s"] = time.perf_counter() - tic

    tic = time.perf_counter()
    if args.copy_detector == "descriptor":
        def views_of(images):
            return copydetect.describe_views(copydetect.thumbnails(images, progress=False))

        views = copydetect.describe_views(copydetect.thumbnails(pool))
    else:
        def views_of(images):
            return [np.asarray(curation.embed(images, backbone, image_size=size, batch_size=args.batch_size,
                                              progress=False))]

        views = [np.asarray(emb, dtype=np.float32)]
    timings["describe_s"] = time.perf_counter() - tic

    calibration = None
    if threshold == "auto":
        tic = time.perf_counter()
        calibration = copydetect.calibrate(pool, views, views_of, seed=args.random_seed)
        threshold = calibration["threshold"]
        print(f"calibration ({args.copy_detector}): 99% of {calibration['planted']} planted copies are >= "
              f"{calibration['copies_low']:.4f}, 99.5% of {calibration['sampled']} sampled images' closest other image "
              f"<= {calibration['distinct_high']:.4f}; threshold {threshold:.4f} finds "
              f"{calibration['copies_found']:.0%} of the copies and links {calibration['distinct_linked']:.1%} of the "
              "images" + ("" if calibration["separated"] else " (copies and distinct images overlap: precision first)"))
        timings["calibrate_s"] = time.perf_counter() - tic

    tic = time.perf_counter()
    candidates = np.arange(len(pool))
    exclusion = None
    if excluded_set is not None:
        reference_views = views_of([_image(excluded_set[i]) for i in range(len(excluded_set))])
        hit, ref, sim = copydetect.find_copies_of(views, reference_views, threshold)
        candidates = np.setdiff1d(candidates, hit)
        ref_names = _names(excluded_set, args.exclude, ref)
        exclusion = {"spec": args.exclude, "reference_images": len(excluded_set), "removed": int(len(hit)),
                     "matches": [[p, r, round(float(x), 4)] for p, r, x in zip(_names(pool, args.data, hit),
                                                                             ref_names, sim)]}
        if len(candidates) == 0:
            raise ValueError(f"every pool image is a copy of an image of --exclude {args.exclude}; "
                             "raise --dedup-threshold or check the specs")
    kept_local, groups_local = copydetect.find_copies([v[candidates] for v in views], threshold, k=args.dedup_k)
    kept, groups = candidates[kept_local], [candidates[g] for g in groups_local]
    removed = len(candidates) - len(kept)
    if removed > args.max_removed * len(candidates):
        raise ValueError(f"copy detection would remove {removed} of {len(candidates)} images "
                         f"({removed / len(candidates):.0%}, more than --max-removed {args.max_removed}); raise "
                         f"--dedup-threshold (now {threshold:.4g}), or raise --max-removed if the pool really is "
                         "mostly copies")
    timings["deduplicate_s"] = time.perf_counter() - tic
    if args.target > len(kept):
        raise ValueError(f"--target {args.target} is larger than the pool after removing copies "
                         f"({len(kept)} of {len(pool)} images left); lower --target")
    sheet = os.path.join(args.output_dir, "duplicates.png")
    copydetect.contact_sheet(lambda i: pool[i], groups, sheet, seed=args.random_seed)

    retrieved = np.zeros(0, dtype=np.int64)
    retrieval = None
    if args.seed_images:
        tic = time.perf_counter()
        seed_set = build_dataset(args.seed_images)
        seed_emb = curation.embed(seed_set, backbone, image_size=size, batch_size=args.batch_size)
        retrieved = kept[curation.retrieve(seed_emb, emb[kept], k=args.retrieve_k)]
        if len(retrieved) > args.target:
            raise ValueError(f"retrieval alone keeps {len(retrieved)} images ({args.retrieve_k} per seed image), more "
                             f"than --target {args.target}; lower --retrieve-k or raise --target")
        retrieval = {"seed_images": len(seed_set), "k": args.retrieve_k, "retrieved": int(len(retrieved))}
        timings["retrieve_s"] = time.perf_counter() - tic

    tic = time.perf_counter()
    rest = np.setdiff1d(kept, retrieved)
    levels = _levels(args.levels, len(rest))
    fill = args.target - len(retrieved)
    hierarchy = curation.hierarchical_kmeans(emb[rest], levels, resampling_steps=args.resampling_steps,
                                             seed=args.random_seed, progress=True)
    sampled = rest[curation.balanced_sample(hierarchy, fill, strategy=args.strategy, seed=args.random_seed)] \
        if fill > 0 else np.zeros(0, dtype=np.int64)
    timings["cluster_and_sample_s"] = time.perf_counter() - tic
    chosen = np.sort(np.concatenate([retrieved, sampled]))

    list_path = os.path.join(args.output_dir, "curated.txt")
    with open(list_path + ".partial", "w") as f:
        for path, label in _image_paths(pool, chosen, args.output_dir):
            f.write(f"{path}\t{label}\n")
    os.replace(list_path + ".partial", list_path)

    top = hierarchy.num_levels - 1
    in_sample = np.isin(rest, sampled)
    before = hierarchy.sizes(top)
    after = np.bincount(hierarchy.labels(top)[in_sample], minlength=len(before))
    threshold_source = ("auto" if calibration else "--dedup-threshold" if args.dedup_threshold is not None
                        else "calibrated default")
    report = {
        "data": args.data, "seed_images": args.seed_images, "backbone": backbone_name, "image_size": size,
        "pool_images": len(pool), "target": args.target, "selected": int(len(chosen)), "list": list_path,
        "excluded": exclusion,
        "duplicates": {"detector": args.copy_detector, "threshold": round(float(threshold), 4),
                       "threshold_from": threshold_source, "calibration": calibration, "k": args.dedup_k,
                       "removed": int(removed), "num_groups": len(groups),
                       "largest_group": max((len(g) for g in groups), default=1), "contact_sheet": sheet,
                       "groups": [_names(pool, args.data, g) for g in groups]},
        "retrieval": retrieval,
        "clusters": {"levels": levels, "resampling_steps": args.resampling_steps, "strategy": args.strategy,
                     "sampled": int(len(sampled)), "top_level_sizes_before": before.tolist(),
                     "top_level_sizes_after": after.tolist()},
        "timings": {k: round(v, 2) for k, v in timings.items()},
    }
    with open(os.path.join(args.output_dir, "report.json.partial"), "w") as f:
        json.dump(report, f, indent=2)
    os.replace(os.path.join(args.output_dir, "report.json.partial"), os.path.join(args.output_dir, "report.json"))
    return report


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = curate(args)
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    d, x = report["duplicates"], report["excluded"]
    print(f"curated {report['selected']} of {report['pool_images']} images: "
          + (f"{x['removed']} copies of --exclude images removed, " if x else "")
          + f"{d['removed']} duplicates removed in {d['num_groups']} groups (check {d['contact_sheet']})"
          + (f", {report['retrieval']['retrieved']} retrieved from {report['retrieval']['seed_images']} seed images"
             if report["retrieval"] else "")
          + f", {report['clusters']['sampled']} sampled evenly over {report['clusters']['levels']} clusters\n"
          f"list: {report['list']} (train with --data list:{report['list']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
