"""Ablation on real photos: from dinolite's tiny-cpu recipe towards Lightly's plain DINO, one change at a time.

    python benchmarks/prepare_photos.py                 # once: Imagenette at 32 and 64 px under ~/data/photos
    nice -n 19 python benchmarks/ablate_photos.py --steps 5016 --curve-every 627 --rows small-photos lightly
    python benchmarks/ablate_photos.py --pixels         # the raw-pixel kNN baseline of --data
    python benchmarks/ablate_photos.py --table          # markdown table of what is finished
    python benchmarks/ablate_photos.py --list           # the rows and their overrides

Every row trains the same backbone (dinolite's ViT, width 96, 3 blocks, 3 heads, patch 8; Lightly's row a
timm ViT of that shape) on the same crops (2 x 32 + 2 x 16) and batch (32) for the same number of steps
(--steps; every schedule spans exactly those steps), one compute thread and no data worker per run, and
measures the teacher's weighted kNN (k 20, T 0.07, [CLS]) with the training split as the memory bank and
the held-out split as queries, at initialisation and at the end (benchmarks/vs_lightly.py does both: the
sides, the data and the kNN are its own). A row is tiny-cpu plus the overrides listed in ROWS, or
another recipe, or Lightly 1.6's DINO as vs_lightly.py runs it.

Each dinolite run also saves its trained teacher backbone (fp16) to teachers/ beside --out.

Resumable: each finished (row, seed, steps, data) is one line of --out (JSONL, appended as it finishes); a
rerun skips those. Runs go one process each, at most --jobs at once, in seed-major order (all rows of seed
0 first), so that an interrupted sweep has whole rows for the first seeds.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = "folder:~/data/photos/imagenette32"  # benchmarks/prepare_photos.py's default output
DEFAULT_OUT = "~/data/photos/ablation.jsonl"

# Lightly 1.6's DINO as vs_lightly.py runs it: AdamW at a constant 5e-4, weight decay 0.04, no warm-up,
# teacher momentum 0.996 -> 1 (cosine), DINO loss on the [CLS] only with the softmax centre (momentum 0.9),
# teacher temperature 0.04, K 4096. In dinolite's terms (peak lr = base_lr * sqrt(32 / 1024)):
LIGHTLY_LR = ["optim.base_lr=0.0028284", "optim.min_lr=0.0005", "optim.warmup_epochs=0"]  # constant 5e-4
LIGHTLY_OBJECTIVE = ["loss.ibot_weight=0", "crops.mask_probability=0", "loss.koleo_weight=0",
                     "loss.centering=softmax_center"]
LIGHTLY_TEMP = ["loss.teacher_temp=0.04", "loss.warmup_teacher_temp=0.04"]
K4096 = ["head.dino_out_dim=4096", "head.ibot_out_dim=4096"]

# name: (side, recipe, overrides of the recipe, what changes). The first rows are the most informative.
ROWS = {
    "tiny-cpu": ("dinolite", "tiny-cpu", [], "tiny-cpu as it is (baseline)"),
    "small-photos": ("dinolite", "small-photos", [], "the small-photos recipe (tiny-cpu with base lr 0.003)"),
    "small-photos-v1": ("dinolite", "tiny-cpu", ["optim.base_lr=0.01", "optim.momentum_teacher=0.996",
                                                 "loss.koleo_weight=0.5"],
                        "small-photos before issue 21 (lr 0.01, momentum 0.996, KoLeo 0.5)"),
    "broken-lr30": ("dinolite", "tiny-cpu", ["optim.base_lr=0.09"],
                    "deliberately broken: small-photos with 30 x its lr (base 0.09)"),
    "lightly": ("Lightly", "tiny-cpu", [], "Lightly 1.6 DINO (timm ViT, K 4096, lr 5e-4 constant)"),
    "k4096": ("dinolite", "tiny-cpu", K4096, "K 4096 prototypes (tiny-cpu: 128)"),
    "temp0.04": ("dinolite", "tiny-cpu", LIGHTLY_TEMP, "teacher temperature 0.04 (tiny-cpu: 0.02; Lightly: 0.04)"),
    "softmax-centre": ("dinolite", "tiny-cpu", ["loss.centering=softmax_center"],
                       "softmax centring (momentum 0.9) instead of Sinkhorn-Knopp"),
    "lr0.01": ("dinolite", "tiny-cpu", ["optim.base_lr=0.01"], "base lr 0.01 (peak 1.8e-3; tiny-cpu 0.03: 5.3e-3)"),
    "lr0.003": ("dinolite", "tiny-cpu", ["optim.base_lr=0.003"],
                "small-photos: base lr 0.003 (peak 5.3e-4, about Lightly's 5e-4)"),
    "lr0.003-k4096": ("dinolite", "tiny-cpu", ["optim.base_lr=0.003"] + K4096, "base lr 0.003 and K 4096"),
    "lr0.001": ("dinolite", "tiny-cpu", ["optim.base_lr=0.001"], "base lr 0.001 (peak 1.8e-4)"),
    "lr0.003-m0.996": ("dinolite", "tiny-cpu", ["optim.base_lr=0.003", "optim.momentum_teacher=0.996",
                                                "optim.final_momentum_teacher=1.0"],
                       "base lr 0.003 and teacher momentum 0.996 -> 1"),
    "lr0.003-t0.04-0.07": ("dinolite", "tiny-cpu", ["optim.base_lr=0.003", "loss.teacher_temp=0.07",
                                                    "loss.warmup_teacher_temp=0.04", "loss.warmup_teacher_temp_epochs=3"],
                           "base lr 0.003 and teacher temperature 0.04 -> 0.07"),
    "lr0.003-wd-constant": ("dinolite", "tiny-cpu", ["optim.base_lr=0.003", "optim.weight_decay_end=0.04"],
                            "base lr 0.003 and weight decay 0.04 constant"),
    "lr0.005": ("dinolite", "tiny-cpu", ["optim.base_lr=0.005"], "base lr 0.005 (peak 8.8e-4)"),
    "lr-lightly": ("dinolite", "tiny-cpu", LIGHTLY_LR, "lr constant 5e-4, no warm-up, as Lightly"),
    "temp0.04-0.07": ("dinolite", "tiny-cpu", ["loss.teacher_temp=0.07", "loss.warmup_teacher_temp=0.04",
                                               "loss.warmup_teacher_temp_epochs=3"],
                      "teacher temperature 0.04 -> 0.07 over 3 of 8 epochs (DINOv2 shape)"),
    "momentum0.996": ("dinolite", "tiny-cpu", ["optim.momentum_teacher=0.996", "optim.final_momentum_teacher=1.0"],
                      "teacher momentum 0.996 -> 1 (tiny-cpu: 0.99 -> 0.999)"),
    "no-ibot": ("dinolite", "tiny-cpu", ["loss.ibot_weight=0", "crops.mask_probability=0"], "no iBOT (no masks)"),
    "no-koleo": ("dinolite", "tiny-cpu", ["loss.koleo_weight=0"], "KoLeo weight 0 (tiny-cpu: 0.1)"),
    "koleo0.5": ("dinolite", "tiny-cpu", ["loss.koleo_weight=0.5"], "KoLeo weight 0.5"),
    "separate-heads": ("dinolite", "tiny-cpu", ["head.share_heads=False"], "separate DINO and iBOT heads"),
    "head2048": ("dinolite", "tiny-cpu", ["head.hidden_dim=2048", "head.bottleneck_dim=256"],
                 "head hidden 2048, bottleneck 256 (tiny-cpu: 256, 64)"),
    "no-warmup": ("dinolite", "tiny-cpu", ["optim.warmup_epochs=0"], "no lr warm-up (tiny-cpu: 1 of 8 epochs)"),
    "wd-constant": ("dinolite", "tiny-cpu", ["optim.weight_decay_end=0.04"], "weight decay 0.04 constant (tiny-cpu: 0.04 -> 0.4)"),
    "crops-wide": ("dinolite", "tiny-cpu", ["crops.global_scale_min=0.32", "crops.local_scale_min=0.05",
                                            "crops.local_scale_max=0.32"],
                   "crop scales 0.32-1 / 0.05-0.32 (DINOv2; tiny-cpu 0.4-1 / 0.1-0.4)"),
    "blur-224px": ("dinolite", "tiny-cpu", ["crops.blur_sigma_min=0.1", "crops.blur_sigma_max=2.0"],
                   "blur sigma 0.1-2 px (unscaled; tiny-cpu 0.014-0.29)"),
    "drop-path0.1": ("dinolite", "tiny-cpu", ["model.drop_path_rate=0.1"], "drop path 0.1 (tiny-cpu: 0)"),
    "layerscale": ("dinolite", "tiny-cpu", ["model.layerscale_init=1e-5"], "LayerScale 1e-5 (tiny-cpu: off)"),
    "dino-only": ("dinolite", "tiny-cpu", LIGHTLY_OBJECTIVE, "DINO loss only, softmax centre (Lightly's objective)"),
    "as-lightly": ("dinolite", "tiny-cpu", LIGHTLY_OBJECTIVE + LIGHTLY_TEMP + LIGHTLY_LR + K4096 + [
        "optim.momentum_teacher=0.996", "optim.final_momentum_teacher=1.0", "optim.weight_decay_end=0.04"],
                   "dinolite with all of Lightly's settings above at once"),
}


def run_args(row: str, seed: int, steps: int, data: str, curve_every: int = 0, size: str = "tiny-cpu"):
    """The vs_lightly.py argument namespace of one run."""
    side, recipe, overrides, _ = ROWS[row]
    return types.SimpleNamespace(size=size, recipe=recipe, objective="dinov2", set=list(overrides), batch=0,
                                 lightly_k=4096, workers=0, seed=seed, steps=steps, budget=0.0, data=data,
                                 knn=None, progress=True, curve_every=curve_every)


def one_thread_vs_lightly():
    """benchmarks/vs_lightly.py (the sides, the data and the kNN), with torch on one compute thread."""
    import torch

    sys.path.insert(0, HERE)
    import vs_lightly

    torch.set_num_threads(1)
    return vs_lightly


def run_one(row: str, seed: int, steps: int, data: str, out: str, curve_every: int = 0, size: str = "tiny-cpu"):
    """Train and measure one (row, seed) in this process (one thread) and append its result line to `out`."""
    import torch

    vs_lightly = one_thread_vs_lightly()
    args = run_args(row, seed, steps, data, curve_every, size)
    teachers = os.path.join(os.path.dirname(os.path.abspath(out)), "teachers")  # dinolite rows' trained teachers
    os.makedirs(teachers, exist_ok=True)
    args.save = os.path.join(teachers, f"{set_name(data)}_{row}_seed{seed}_{steps}.pth")
    cfg = vs_lightly.dinolite_config(args)
    images, knn_sets = vs_lightly.prepare_data(args, cfg.crops.global_size)
    tic = time.time()
    r = vs_lightly.train_and_measure(ROWS[row][0], args, images, knn_sets)
    before, after = r["knn_before"][data], r["knn_after"][data]
    line = dict(row=row, seed=seed, steps=steps, data=data, size=size, side=ROWS[row][0], recipe=ROWS[row][1],
                overrides=ROWS[row][2], knn_init=before, knn_end=after, gain=after - before,
                s_per_step=statistics.median(r["times"][1:]), cpu_s_per_step=statistics.median(r["cpu_times"][1:]),
                curve=[[s, k[data]] for s, k in r["curve"]],
                wall_s=time.time() - tic, torch=torch.__version__, finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    with open(out, "a") as f:  # one short write per line: appends from concurrent runs do not interleave
        f.write(json.dumps(line) + "\n")
    print(f"{row} seed {seed}: kNN {before:.2f} -> {after:.2f} ({after - before:+.2f}), "
          f"{line['s_per_step']:.3f} s/step", flush=True)


def pixels_line(data: str) -> dict:
    """The raw-pixel baseline of `data`: the same weighted kNN on the pixel vectors (S x S x 3 at the
    folder's own size S)."""
    vs_lightly = one_thread_vs_lightly()
    sets = {data: vs_lightly.labelled_set(data, 32)}
    knn = vs_lightly.knn_top1(lambda images: images.flatten(1), sets)[data]
    train_labels = sets[data][1]
    return dict(row="pixels", data=data, knn_end=knn, classes=int(train_labels.max()) + 1,
                train_images=len(sets[data][0]), held_out_images=len(sets[data][2]))


def set_name(data: str) -> str:
    """folder:/any/where/imagenette32 -> imagenette32: results recorded on one machine read on another."""
    return os.path.basename(os.path.normpath(os.path.expanduser(data.split(":", 1)[-1])))


def load_results(out: str) -> list:
    if not os.path.exists(out):
        return []
    with open(out) as f:
        return [json.loads(line) for line in f if line.strip()]


def table(out: str, steps: int | None, data: str) -> str:
    """Markdown table: one line per row with results, in ROWS order: means over seeds, the gain's spread, and the
    median CPU seconds per step of the run's process (data loading included; steadier than the wall clock on a
    shared machine)."""
    everything = [r for r in load_results(out) if set_name(r["data"]) == set_name(data)]
    results = [r for r in everything if r["row"] != "pixels" and (steps is None or r["steps"] == steps)]
    lines = []
    pixels = [r for r in everything if r["row"] == "pixels"]
    if pixels:
        lines += [f"Raw pixels: kNN {pixels[-1]['knn_end']:.2f}; chance {100 / pixels[-1]['classes']:.0f}%.", ""]
    lines += ["| change | kNN init | kNN end | gain | gain spread (std; min..max) | seeds | steps | CPU s/step |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row, (_, _, _, what) in ROWS.items():
        for n_steps in sorted({r["steps"] for r in results if r["row"] == row}):
            rs = [r for r in results if r["row"] == row and r["steps"] == n_steps]
            gains = [r["gain"] for r in rs]
            std = f"{statistics.stdev(gains):.2f}; " if len(gains) > 1 else ""
            lines.append(f"| {what} | {statistics.mean(r['knn_init'] for r in rs):.2f} | "
                         f"{statistics.mean(r['knn_end'] for r in rs):.2f} | {statistics.mean(gains):+.2f} | "
                         f"{std}{min(gains):+.2f}..{max(gains):+.2f} | {len(rs)} | {n_steps} | "
                         f"{statistics.median(r['cpu_s_per_step'] for r in rs):.3f} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", default=list(ROWS), help="rows to run, in this order (default: all)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help="steps per run (default 1000; with --table: all)")
    p.add_argument("--data", default=DEFAULT_DATA, help="folder:PATH with train/ and val/ class folders")
    p.add_argument("--out", default=DEFAULT_OUT, help="results JSONL (appended; finished runs are skipped)")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each)")
    p.add_argument("--logs", default="", help="folder for each run's log (default: next to --out)")
    p.add_argument("--curve-every", type=int, default=0,
                   help="also measure the kNN every this many steps (not timed; stored as the line's curve)")
    p.add_argument("--size", choices=["tiny-cpu", "tiny-cpu-64"], default="tiny-cpu",
                   help="the crops: tiny-cpu (2 x 32 + 2 x 16) or tiny-cpu-64 (2 x 64 + 2 x 32, for 64-px photos)")
    p.add_argument("--pixels", action="store_true", help="append the raw-pixel kNN baseline of --data to --out")
    p.add_argument("--table", action="store_true", help="print the markdown table of --out and exit")
    p.add_argument("--list", action="store_true", help="print the rows and exit")
    p.add_argument("--one", nargs=2, metavar=("ROW", "SEED"), help=argparse.SUPPRESS)
    args = p.parse_args()
    args.out = os.path.expanduser(args.out)
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    if args.list:
        for row, (side, recipe, overrides, what) in ROWS.items():
            print(f"{row:>15}: {what}  [{side}, {recipe}{', ' if overrides else ''}{' '.join(overrides)}]")
        return
    if args.table:
        print(table(args.out, args.steps, args.data))
        return
    if args.pixels:
        with open(args.out, "a") as f:
            f.write(json.dumps(pixels_line(args.data)) + "\n")
        return
    args.steps = args.steps or 1000
    if args.one:
        run_one(args.one[0], int(args.one[1]), args.steps, args.data, args.out, args.curve_every, args.size)
        return
    path = args.data[len("folder:"):] if args.data.startswith("folder:") else args.data
    if not os.path.isdir(os.path.expanduser(path)):
        p.error(f"{path} is not a folder; build it with benchmarks/prepare_photos.py or give --data folder:PATH")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    logs = args.logs or os.path.join(os.path.dirname(os.path.abspath(args.out)), "ablation_logs")
    os.makedirs(logs, exist_ok=True)
    done = {(r["row"], r["seed"], r["steps"], r["data"]) for r in load_results(args.out) if r["row"] != "pixels"}
    todo = [(row, seed) for seed in args.seeds for row in args.rows if (row, seed, args.steps, args.data) not in done]
    print(f"{len(todo)} runs to do ({len(done)} results in {args.out}), {args.jobs} at once, {args.steps} steps each",
          flush=True)
    running = []
    while todo or running:
        while todo and len(running) < args.jobs:
            row, seed = todo.pop(0)
            data_name = os.path.basename(os.path.normpath(args.data.split(":", 1)[-1]))
            log = open(os.path.join(logs, f"{data_name}_{row}_seed{seed}_{args.steps}.log"), "w")
            cmd = [sys.executable, os.path.abspath(__file__), "--one", row, str(seed), "--steps", str(args.steps),
                   "--data", args.data, "--out", args.out, "--curve-every", str(args.curve_every), "--size", args.size]
            env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), row, seed, log,
                            time.time()))
            print(f"{time.strftime('%H:%M:%S')} start {row} seed {seed}", flush=True)
        time.sleep(5)
        for item in list(running):
            proc, row, seed, log, start = item
            if proc.poll() is not None:
                running.remove(item)
                log.close()
                status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see {log.name})"
                print(f"{time.strftime('%H:%M:%S')} {status}: {row} seed {seed} in {time.time() - start:.0f} s",
                      flush=True)
    print(table(args.out, args.steps, args.data))


if __name__ == "__main__":
    main()
