"""Command line: dinolite-embed --checkpoint RUN|FILE|HUB-NAME --data SPEC --output emb.npy

Embeds every image of a dataset with a trained backbone: the [CLS] feature after the final norm
(x_norm_clstoken), one float32 row per image, in the dataset's order, written to --output (numpy .npy),
and beside it <output>.paths.txt: one line per row, PATH<TAB>LABEL (LABEL -1: unlabelled), the format of a
list: data spec. Images of generated datasets (textures, builtin) have no file: their line is SPEC#INDEX.

--checkpoint takes a dinolite run directory (RUN or RUN@STEP), a distillation run (--student picks the
student), a scale/ run with its exported teacher_backbone_official*.pth, a checkpoint or official-layout .pth
file, or a hub name (dinov2_vits14, dinov3_vits16, ...) whose released file is in torch.hub's cache.
Nothing is downloaded. Bad input prints one line `error: ...` and exits with code 2.

Example:
    dinolite-embed --checkpoint runs/tiny --data folder:~/photos --output runs/tiny/photos.npy
"""
import argparse
import os
import sys

import numpy as np
import torch

from dinolite.data import DATA_SPEC_FORMS, EvalTransform, build_dataset
from dinolite.eval import extract_features
from dinolite.loading import load_backbone


def add_backbone_arguments(parser: argparse.ArgumentParser) -> None:
    """--checkpoint, --config, --student, --image-size, --batch-size (shared with dinolite-eval)."""
    parser.add_argument("--checkpoint", required=True, metavar="RUN|FILE|HUB-NAME",
                        help="a run directory (RUN or RUN@STEP; dinolite, distillation or scale/), a .pth file, or a "
                             "hub name such as dinov2_vits14 (its file in torch.hub's cache)")
    parser.add_argument("--config", help="recipe, YAML file or hub name of an official-layout file that has no "
                        "config.yaml beside it")
    parser.add_argument("--student", default="student", help="which student of a distillation run (default: student)")
    parser.add_argument("--image-size", type=int, help="input resolution (default: the run's global crop size; 224 "
                        "for hub models)")
    parser.add_argument("--batch-size", type=int, default=64)


def eval_transform(image_size: int, hub: bool) -> EvalTransform:
    """Resize the shorter side, centre-crop image_size: as the training kNN for dinolite runs (resize = crop);
    the official 256 -> 224 ratio for hub models."""
    return EvalTransform(resize_size=image_size * 8 // 7 if hub else image_size, crop_size=image_size)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def item_names(dataset, spec: str, labels=None) -> list[str]:
    """PATH<TAB>LABEL of every item: the image file where there is one, else SPEC#INDEX (labels: as extracted)."""
    samples = getattr(dataset, "samples", None)
    if samples is not None and len(samples) == len(dataset):
        return [f"{os.path.abspath(path)}\t{int(label)}" for path, label in samples]
    labels = [-1] * len(dataset) if labels is None else [int(v) for v in labels]
    return [f"{spec}#{i}\t{label}" for i, label in enumerate(labels)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dinolite-embed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="data specs:\n  " + "\n  ".join(DATA_SPEC_FORMS))
    add_backbone_arguments(parser)
    parser.add_argument("--data", required=True, help="the images to embed (a data spec)")
    parser.add_argument("--output", required=True, help="the .npy file to write ([N, D] float32)")
    parser.add_argument("--normalize", action="store_true", help="L2-normalise each row (cosine = dot product)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    return parser


def load_for_eval(args):
    """(backbone, image size, eval transform) from the shared --checkpoint/--config/--student/--image-size flags."""
    backbone = load_backbone(args.checkpoint, args.config, args.student)
    size = args.image_size or backbone.image_size
    if size % backbone.model.patch_size:
        raise ValueError(f"--image-size {size} is not a multiple of the patch size {backbone.model.patch_size}")
    return backbone, size, eval_transform(size, backbone.hub_name is not None)


def embed(args) -> tuple[str, str, tuple]:
    """The command behind the parser; returns (embeddings path, paths file, shape)."""
    output = os.path.expanduser(args.output)
    if not output.endswith(".npy"):
        raise ValueError(f"--output {args.output} must end in .npy (numpy's format)")
    paths_file = output[: -len(".npy")] + ".paths.txt"
    if os.path.exists(output) and not args.overwrite:
        raise ValueError(f"{args.output} exists; pass --overwrite to replace it or choose another --output")
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise ValueError(f"the folder of --output ({os.path.dirname(args.output)}) does not exist; create it first")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    backbone, size, transform = load_for_eval(args)
    dataset = build_dataset(args.data, transform=transform, train=True)
    print(f"embedding {len(dataset)} images of {args.data} at {size} px with {backbone.description}", file=sys.stderr)
    extracted = extract_features(backbone.model.to(device()), dataset, batch_size=args.batch_size)
    features = extracted["cls"]
    if args.normalize:
        features = torch.nn.functional.normalize(features, dim=-1)
    with open(output + ".partial", "wb") as f:  # written whole, then renamed: never a truncated file
        np.save(f, features.numpy().astype(np.float32))
    with open(paths_file + ".partial", "w") as f:
        f.write("\n".join(item_names(dataset, args.data, extracted.get("labels"))) + "\n")
    os.replace(output + ".partial", output)
    os.replace(paths_file + ".partial", paths_file)
    return output, paths_file, tuple(features.shape)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        output, paths_file, shape = embed(args)
    except (ValueError, OSError) as e:  # LoadError, DataError and the data's FileNotFoundError are among them
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"wrote {output} ({shape[0]} x {shape[1]} float32) and {paths_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
