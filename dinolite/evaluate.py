"""Command line: dinolite-eval knn|linear --checkpoint RUN|FILE|HUB-NAME --train SPEC --val SPEC

Evaluates a frozen backbone on your own labelled images, as the papers do (chapter 8):
  knn     DINO's weighted kNN on the [CLS] features (k 20, temperature 0.07, cosine similarity);
  linear  a linear classifier on the [CLS] features (an lr / weight-decay sweep on a held-out fifth of
          --train, then the best pair retrained on all of it).
It prints top-1 and top-5 accuracy on --val for the checkpoint and for the same network at its random
initialisation (the baseline that tells what training added; --no-baseline skips it).

Labels: a folder: spec needs one subfolder per class (the same class names in --train and --val); a list:
file a TAB and an integer label per line; the generated datasets and torchvision ones have labels.
--checkpoint is read as by dinolite-embed (a dinolite, distillation or scale/ run, a .pth file, a hub name).
Bad input prints one line `error: ...` and exits with code 2.

Example:
    dinolite-eval knn --checkpoint runs/photos --train folder:~/labelled/train --val folder:~/labelled/val
"""
import argparse
import sys

import torch

from dinolite.data import DATA_SPEC_FORMS, build_dataset
from dinolite.embed import add_backbone_arguments, device, load_for_eval
from dinolite.eval import extract_features, knn_classify, linear_probe


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dinolite-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="data specs:\n  " + "\n  ".join(DATA_SPEC_FORMS))
    parser.add_argument("protocol", choices=("knn", "linear"), help="kNN classifier or linear probe")
    add_backbone_arguments(parser)
    parser.add_argument("--train", required=True, help="labelled images to fit on (kNN memory / probe training set)")
    parser.add_argument("--val", required=True, help="labelled images to score (the test split of torchvision data)")
    parser.add_argument("--k", type=int, default=20, help="kNN neighbours (DINO: 20)")
    parser.add_argument("--temperature", type=float, default=0.07, help="kNN vote temperature (DINO: 0.07)")
    parser.add_argument("--epochs", type=int, default=100, help="linear probe epochs (full batch)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the network at initialisation")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialisation baseline and the probe")
    return parser


def _labelled(spec: str, dataset, labels: torch.Tensor | None, role: str) -> torch.Tensor:
    if labels is None or len(labels) == 0 or int(labels.min()) < 0:
        raise ValueError(f"{role} {spec} has unlabelled images: give a folder with one subfolder per class, a list: "
                         "file with PATH<TAB>LABEL lines, or a labelled dataset")
    return labels


def _val_to_train_labels(train_set, val_set, val_labels: torch.Tensor, args) -> torch.Tensor:
    """Folder datasets number classes by sorted subfolder name: match --val's classes to --train's by name."""
    train_classes, val_classes = getattr(train_set, "classes", None), getattr(val_set, "classes", None)
    if train_classes is None or val_classes is None or list(train_classes) == list(val_classes):
        return val_labels
    unknown = sorted(set(val_classes) - set(train_classes))
    if unknown:
        raise ValueError(f"--val {args.val} has classes that --train {args.train} lacks: {', '.join(unknown[:5])}")
    index = torch.tensor([list(train_classes).index(c) for c in val_classes])
    return index[val_labels]


def _scores(protocol: str, train: dict, val: dict, num_classes: int, args) -> dict:
    """{"top1", "top5" (None with 5 classes or fewer)} in percent."""
    if protocol == "knn":
        result = knn_classify(train["cls"], train["labels"], val["cls"], val["labels"], k=args.k,
                              temperature=args.temperature, num_classes=num_classes)
        return {"top1": result["top1"], "top5": result.get("top5")}
    result = linear_probe(train["cls"], train["labels"], val["cls"], val["labels"], num_classes=num_classes,
                          epochs=args.epochs, seed=args.seed)
    top5 = None
    if num_classes > 5:
        with torch.no_grad():
            best = result["probe"](val["cls"]).topk(5, dim=-1).indices
        top5 = 100.0 * (best == val["labels"][:, None]).any(dim=-1).float().mean().item()
    return {"top1": result["top1"], "top5": top5}


def evaluate(args) -> dict:
    """The command behind the parser: {"checkpoint": scores, "init": scores or None, ...}."""
    if args.k < 1:
        raise ValueError(f"--k must be >= 1, got {args.k}")
    if args.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
    backbone, size, transform = load_for_eval(args)
    train_set = build_dataset(args.train, transform=transform, train=True)
    val_set = build_dataset(args.val, transform=transform, train=False)

    def features(model):
        model = model.to(device())
        train = extract_features(model, train_set, batch_size=args.batch_size)
        val = extract_features(model, val_set, batch_size=args.batch_size)
        train["labels"] = _labelled(args.train, train_set, train.get("labels"), "--train")
        val["labels"] = _val_to_train_labels(train_set, val_set, _labelled(args.val, val_set, val.get("labels"), "--val"), args)
        return train, val

    print(f"{args.protocol} on {len(train_set)} --train / {len(val_set)} --val images at {size} px: "
          f"{backbone.description}", file=sys.stderr)
    train, val = features(backbone.model)
    num_classes = int(max(train["labels"].max(), val["labels"].max())) + 1
    report = {"protocol": args.protocol, "num_classes": num_classes, "train_images": len(train_set),
              "val_images": len(val_set), "image_size": size, "checkpoint": _scores(args.protocol, train, val,
                                                                                       num_classes, args)}
    report["init"] = None
    if not args.no_baseline:
        train, val = features(backbone.at_init(args.seed))
        report["init"] = _scores(args.protocol, train, val, num_classes, args)
    return report


def format_report(report: dict, checkpoint: str) -> str:
    """The printed table: one row per network, top-1 and top-5 in percent."""
    name = {"knn": "kNN", "linear": "linear probe"}[report["protocol"]]
    lines = [f"{name} of {checkpoint} on {report['val_images']} val images ({report['num_classes']} classes, "
             f"{report['train_images']} train images, {report['image_size']} px)",
             f"  {'network':<18s} {'top-1':>6s} {'top-5':>6s}"]
    rows = [("checkpoint", report["checkpoint"])]
    if report["init"] is not None:
        rows.append(("at initialisation", report["init"]))
    for label, scores in rows:
        top5 = f"{scores['top5']:6.1f}" if scores["top5"] is not None else f"{'-':>6s}"
        lines.append(f"  {label:<18s} {scores['top1']:6.1f} {top5}")
    if report["num_classes"] <= 5:
        lines.append("  (top-5 needs more than 5 classes)")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = evaluate(args)
    except (ValueError, OSError) as e:  # LoadError, DataError and the data's FileNotFoundError are among them
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    print(format_report(report, args.checkpoint))
    return 0


if __name__ == "__main__":
    sys.exit(main())
