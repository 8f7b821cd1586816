"""Command line: dinolite-report RUN [--data SPEC] [--output FILE]

Writes one self-contained HTML page about a training run (images inlined as PNG, no other file needed):
  - the loss curves, the teacher's (or students') kNN accuracy and the collapse monitors over the steps, with
    the early warnings the run gave (replayed from metrics.jsonl with the loop's own rules) marked;
  - PCA maps of the patch features and the [CLS] attention maps of the final backbone on a few of the run's
    images (--data, by default the spec the run recorded in RUN/data.txt; without one, the photographs
    bundled with scikit-image);
  - nearest-neighbour retrievals among the --data images;
  - the run's config.
RUN is a dinolite-train run, a distillation run (its main student) or a scale/ run (its exported teacher,
config.yaml's dist: section shown but not needed). A piece that is missing (no kNN logged, no exported
backbone yet, no --data) is skipped and the page says why. Figures follow dinolite.viz's book style
(use_book_style) and are checked with viz.check_figure. Default output: RUN/report.html.

Example:
    dinolite-report runs/tiny
"""
import argparse
import base64
import html
import io
import json
import math
import os
import sys

import torch
import yaml

from dinolite import viz
from dinolite.data import DATA_SPEC_FORMS, EvalTransform, build_dataset, sample_photos
from dinolite.data.spec import read_data_spec
from dinolite.eval import extract_features, retrieve
from dinolite.loading import LoadError, load_backbone
from dinolite.monitor import BelowStartWarning

# The loop's early warnings (dinolite.train.loop): kNN below its value at initialisation, the effective rank
# of the student's [CLS] features below half its first value, each for 2 evaluations in a row.
WATCHES = (("knn_top1", "the teacher's kNN top-1 (%)", 1.0), ("monitor/effective_rank",
           "the effective rank of the student's [CLS] features", 0.5))
LOSS_PARTS = ("dino", "ibot", "koleo", "gram")


# ----------------------------------------------------------------------------- reading the run
def read_metrics(run: str) -> list[dict]:
    """metrics.jsonl as a list of records (a torn last line of a killed run is skipped)."""
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return [r for r in records if isinstance(r, dict) and "step" in r]


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of every record that logged `key` with a finite number."""
    pairs = [(r["step"], r[key]) for r in records
             if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [s for s, _ in pairs], [v for _, v in pairs]


def early_warnings(records: list[dict]) -> list[tuple[str, int, str]]:
    """[(key, step, message)] of the warnings the run gave, replayed with the loop's BelowStartWarning rules."""
    events = []
    for key, name, fraction in WATCHES:
        watch = BelowStartWarning(name, fraction=fraction)
        for step, value in zip(*series(records, key)):
            message = watch.update(value, step)
            if message:
                events.append((key, step, message))
    return events


def run_kind(run: str, config: dict) -> str:
    if "dist" in config or any(name.startswith("dcp_") for name in os.listdir(run)):
        return "scale"
    return "distillation" if (config.get("teacher") or {}).get("checkpoint") else "dinolite"


# ----------------------------------------------------------------------------- figures
def png(fig) -> str:
    """The figure as a base64 PNG <img> (and the figure closed)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return f'<img alt="figure" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def curves_figure(records: list[dict], keys: list[str], ylabel: str, events=(), title=None):
    """One axes per key group: values over steps; early-warning steps as red dashed lines."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(viz.PAGE_WIDTH, 3.2))
    for key in keys:
        steps, values = series(records, key)
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, label=key)
    for i, (_, step, _) in enumerate(events):
        ax.axvline(step, color="tab:red", linestyle="--", label="early warning" if i == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(loc="best")
    return fig


def monitors_figure(records: list[dict], keys: list[str], events):
    import matplotlib.pyplot as plt

    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(viz.PAGE_WIDTH, 2.8 * nrows), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.axis("off")
    for ax, key in zip(axes.flat, keys):
        steps, values = series(records, key)
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None)
        for _, step, _ in (e for e in events if e[0] == key):
            ax.axvline(step, color="tab:red", linestyle="--")
        ax.set_title(key.removeprefix("monitor/").replace("_", " "))
        ax.set_xlabel("step")
    return fig


# ----------------------------------------------------------------------------- the page
STYLE = """
body { font-family: system-ui, sans-serif; margin: 0; color: #222; }
main { max-width: 860px; margin: 0 auto; padding: 1em 1.5em 3em; }
img { max-width: 100%; height: auto; display: block; margin: 0.5em 0; }
pre { white-space: pre-wrap; overflow-wrap: anywhere; background: #f5f5f5; padding: 0.6em; font-size: 0.85em; }
.note { color: #8a5a00; }
.warning { color: #a00; }
table { border-collapse: collapse; } td, th { padding: 0.2em 0.8em; text-align: left; }
"""


class Page:
    """The page as a list of HTML pieces; `missing` says what could not be shown and why."""

    def __init__(self):
        self.parts, self.figure_problems = [], []

    def heading(self, text: str):
        self.parts.append(f"<h2>{html.escape(text)}</h2>")

    def text(self, text: str, cls: str | None = None):
        attribute = f' class="{cls}"' if cls else ""
        self.parts.append(f"<p{attribute}>{html.escape(text)}</p>")

    def missing(self, text: str):
        self.text("Not shown: " + text, "note")

    def pre(self, text: str):
        self.parts.append(f'<div class="cell_output"><pre>{html.escape(text)}</pre></div>')

    def figure(self, fig, caption: str):
        self.figure_problems += [f"{caption}: {p}" for p in viz.check_figure(fig)]
        self.parts.append(f'<figure class="cell_output">{png(fig)}<figcaption>{html.escape(caption)}</figcaption></figure>')

    def html(self, title: str) -> str:
        body = "\n".join(self.parts)
        return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
                f"<style>{STYLE}</style></head><body><main>\n<h1>{html.escape(title)}</h1>\n{body}\n</main></body></html>\n")


def _images(data: str | None, size: int, count: int):
    """(a few images [count, 3, size, size], their source in words, the dataset for retrieval or None)."""
    transform = EvalTransform(resize_size=size, crop_size=size)
    if data is None:
        photos = [transform(p) for p in sample_photos()[:count]]
        return torch.stack(photos), "the photographs bundled with scikit-image (pass --data for the run's own)", None
    dataset = build_dataset(data, transform=transform, train=True)
    step = max(1, len(dataset) // count)
    picks = [dataset[i * step] for i in range(min(count, len(dataset)))]
    images = torch.stack([p[0] if isinstance(p, (tuple, list)) else p for p in picks])
    return images, f"the first images of {data}", dataset


def _feature_sections(page: Page, backbone, data: str | None, count: int, pool: int, seed: int):
    model, size = backbone.model, backbone.image_size
    images, source, dataset = _images(data, size, count)
    page.heading("Patch features and attention")
    page.text(f"Backbone: {backbone.description}, at {size} px, on {source}.")
    out = extract_features(model, images, patch_tokens=True, progress=False)
    page.figure(viz.plot_pca(images, viz.pca_rgb(out["patch"])),
                "first three principal components of the patch features (fitted on these images together), as RGB")
    maps = viz.cls_attention_maps(model, images[:2])
    for i in range(len(maps)):
        page.figure(viz.plot_attention_maps(images[i], maps[i][:6], title=f"image {i}: [CLS] attention, last block"),
                    f"attention of the [CLS] token to every patch in the last block (first {min(6, len(maps[i]))} heads)")
    page.heading("Nearest neighbours")
    if dataset is None:
        page.missing("retrievals need a pool of the run's images: pass --data SPEC.")
        return
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(dataset), generator=generator)[: min(pool, len(dataset))]
    subset = torch.utils.data.Subset(dataset, chosen.tolist())
    features = extract_features(model, subset, batch_size=64, progress=False)
    if len(subset) < 6:
        page.missing(f"retrievals need at least 6 images, {data} has {len(subset)}.")
        return
    queries = torch.arange(min(4, len(subset)))
    scores, indices = retrieve(features["cls"][queries], features["cls"], k=5 + 1, exclude_self=False)
    scores, indices = scores[:, 1:], indices[:, 1:]  # the first neighbour of a query is the query itself
    labels = features.get("labels")
    labelled = labels is not None and bool((labels >= 0).all())
    query_images = [subset[int(q)] for q in queries]
    page.text(f"Each row: a query from {len(subset)} images of {data}, then its 5 nearest neighbours by cosine "
              "similarity of the [CLS] features" + (" (green frame: same label, red: another)." if labelled else "."))
    page.figure(viz.plot_retrieval(query_images, subset, indices, scores,
                                   labels[queries] if labelled else None, labels if labelled else None),
                "nearest neighbours of 4 queries")


def build_report(run: str, data: str | None = None, images: int = 4, pool: int = 200, seed: int = 0,
                 student: str = "student") -> tuple[str, list[str]]:
    """(the page's HTML, the figures' style problems). Raises LoadError when RUN is no run directory."""
    import matplotlib as mpl

    if not os.path.isdir(run) or not os.path.isfile(os.path.join(run, "config.yaml")):
        raise LoadError(f"{run} is not a run directory (no config.yaml): give the --output-dir of dinolite-train "
                        "or scale/train.py")
    data = data or read_data_spec(run)  # the spec the run recorded in RUN/data.txt
    config_text = open(os.path.join(run, "config.yaml")).read()
    config = yaml.safe_load(config_text) or {}
    kind = run_kind(run, config)
    records = read_metrics(run)
    page = Page()
    with mpl.rc_context():
        viz.use_book_style()
        steps = max((r["step"] for r in records), default=0)
        page.text(f"A {kind} run: {steps} steps logged in metrics.jsonl"
                  + (f", recipe of {config['model'].get('embed_dim')}-wide ViT with {config['model'].get('depth')} "
                     f"blocks, patch {config['model'].get('patch_size')}." if isinstance(config.get("model"), dict) else "."))

        page.heading("Training curves")
        loss_keys = [k for k in dict.fromkeys(k for r in records for k in r) if k == "loss" or k.startswith("loss/")]
        part_keys = [k for k in LOSS_PARTS if series(records, k)[0]]
        if loss_keys:
            page.figure(curves_figure(records, loss_keys, "loss", title="training loss"), "total loss per logged step")
            if part_keys:
                page.figure(curves_figure(records, part_keys, "loss", title="loss terms (main network)"),
                            "the DINO, iBOT, KoLeo (and Gram) terms")
        else:
            page.missing("metrics.jsonl has no loss records (the run has not logged a step yet).")

        events = early_warnings(records)
        knn_keys = [k for k in dict.fromkeys(k for r in records for k in r)
                    if k == "knn_top1" or (k.startswith("knn_top1/") and k != "knn_top1/student")]
        if knn_keys:
            page.figure(curves_figure(records, knn_keys, "kNN top-1 (%)", [e for e in events if e[0] == "knn_top1"],
                                      title="kNN accuracy (step 0: the network at initialisation)"),
                        "weighted kNN top-1 on the held-out split, over the steps")
        else:
            page.missing("no kNN accuracy in metrics.jsonl (train.knn_every=0, data without labels, or a scale/ run).")
        monitor_keys = [k for k in dict.fromkeys(k for r in records for k in r)  # constant ones are sizes: skipped
                        if k.startswith("monitor/") and (k in {w[0] for w in WATCHES} or len(set(series(records, k)[1])) > 1)]
        if monitor_keys:
            page.figure(monitors_figure(records, monitor_keys, events), "collapse monitors of the student, over the steps")
        else:
            page.missing("no collapse monitors in metrics.jsonl (train.monitor_every=0, or a scale/ run).")
        page.heading("Early warnings")
        if not knn_keys and not monitor_keys:
            page.missing("no kNN or monitor values to check.")
        elif events:
            for _, _, message in events:
                page.text(message, "warning")
        else:
            page.text("None: neither the kNN accuracy nor the effective rank stayed below its first value (half of it "
                      "for the rank) for two evaluations in a row.")

        try:
            backbone = load_backbone(run, student=student)
        except LoadError as e:
            page.heading("Patch features and attention")
            page.missing(f"no backbone to look at ({str(e).splitlines()[0]}).")
        else:
            _feature_sections(page, backbone, data, images, pool, seed)

        page.heading("Config")
        page.pre(config_text)
    if page.figure_problems:
        page.heading("Figure style problems")
        page.pre("\n".join(page.figure_problems))
    return page.html(f"Run report: {os.path.basename(os.path.normpath(run))}"), page.figure_problems


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dinolite-report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="data specs:\n  " + "\n  ".join(DATA_SPEC_FORMS))
    parser.add_argument("run", help="a run directory of dinolite-train (also distillation) or scale/train.py")
    parser.add_argument("--data", help="the run's data spec: its images for the feature maps and retrievals "
                        "(default: the spec the run recorded in RUN/data.txt)")
    parser.add_argument("--output", help="the HTML file to write (default: RUN/report.html)")
    parser.add_argument("--student", default="student", help="which student of a distillation run to look at")
    parser.add_argument("--images", type=int, default=4, help="images in the PCA figure")
    parser.add_argument("--pool", type=int, default=200, help="images searched for the nearest neighbours")
    return parser


def main(argv=None) -> int:
    import matplotlib

    matplotlib.use("Agg")  # a file is written; no window
    args = build_parser().parse_args(argv)
    if args.images < 2:
        print(f"error: --images must be >= 2, got {args.images}", file=sys.stderr)
        return 2
    output = args.output or os.path.join(args.run, "report.html")
    try:
        page, problems = build_report(args.run, args.data, args.images, args.pool, student=args.student)
        with open(output + ".partial", "w") as f:
            f.write(page)
        os.replace(output + ".partial", output)
    except (ValueError, OSError) as e:  # LoadError, DataError and the data's FileNotFoundError are among them
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"wrote {output}" + (f" ({len(problems)} figure style problems, listed on the page)" if problems else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
