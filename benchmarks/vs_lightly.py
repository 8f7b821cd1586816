"""dinolite against Lightly's DINO, side by side: step time and kNN on real images, one thread each.

    pip install -e ".[bench]"                                   # lightly, timm, scikit-learn
    python benchmarks/vs_lightly.py                             # ViT-tiny/4, 2x32 + 4x16 crops, batch 128
    python benchmarks/vs_lightly.py --size tiny-cpu --data digits --budget 300 --objective dinov2
    python benchmarks/vs_lightly.py --size tiny-cpu --data folder:~/data/photos/imagenette32 \
        --steps 1000 --seeds 0 1 2 --objective dinov2 --recipe tiny-cpu --lightly-k 4096

Both sides train the same backbone shape (dinolite's VisionTransformer; a timm VisionTransformer for
Lightly) on the same images with the same crops (sizes, counts, scales, blur sigmas) and batch, as two
processes that run at the same time, one compute thread and one data worker each, for the same
wall-clock budget (--budget seconds) or the same number of steps (--steps: equal work; the schedules
then span exactly those steps). Printed: each side's steps and s/step (median and quartiles, data
loading included), the ratio dinolite/Lightly of the median step times, and each side's teacher kNN
(weighted, k 20, T 0.07) at initialisation and at the end and its gain; with several --seeds (each
seed sets both sides' initialisation, data order and augmentations), the mean and spread over seeds.

Sides:
  dinolite  the public API: get_config(recipe) + apply_overrides, DINOv2MetaArch, build_optimizer,
            StepBatches (its own multi-crop augmentation and masking), schedule_values, train_step.
            --objective same: DINO loss only (iBOT weight 0 and no masks, KoLeo weight 0) with the
            softmax centre and EMA-updated centre, as Lightly's DINOLoss, in fp32: the same work per step.
            --objective dinov2: the recipe as it is (iBOT with masks, KoLeo, Sinkhorn-Knopp, its precision:
            small-photos says auto, bf16 where a probe finds it faster).
  Lightly   lightly 1.6 as its DINO example uses it: DINOTransform, DINOProjectionHead (same hidden,
            bottleneck and prototype sizes as dinolite's head), DINOLoss (its defaults: teacher
            temperature 0.04, centre momentum 0.9), update_momentum with a cosine momentum schedule
            (0.996 -> 1), cancel_last_layer_gradients, AdamW at a constant lr of 5e-4 (foreach, as
            dinolite's), a student forward per view and a teacher forward per global view.

Data (no download): "photos" cuts the photographs bundled in scikit-image into tiles (unlabelled; kNN
is then measured on digits), "digits" is scikit-learn's 1797 handwritten digits (8x8, upscaled),
"faces" scikit-image's LFW subset (100 faces, 100 non-faces, 25x25, upscaled), "textures" dinolite's
SyntheticTextures (not real photos). Labelled sets are split 3:1 (train:held-out) for kNN.
"folder:PATH" trains on PATH/train/<class>/* and measures kNN with PATH/train as the memory bank and
PATH/val (or PATH/test) as the held-out split; a PATH without train/ is one set of class folders, split
3:1. E.g. Imagenette at 32 px, built by benchmarks/prepare_photos.py (not in the repository).

What it does not measure: multi-process or GPU speed, accuracy after long training, and any other
Lightly configuration (other backbones, other transforms): see README "dinolite vs Lightly".
"""
import argparse
import copy
import math
import multiprocessing as mp
import os
import statistics
import time

import numpy as np
import torch
from PIL import Image

SIZES = {
    # the size of issue 16: ViT-tiny/4 (dim 192, depth 12, 3 heads), 2 global 32 px + 4 local 16 px, batch 128
    "vit-tiny4": ["model.embed_dim=192", "model.depth=12", "model.num_heads=3", "model.patch_size=4",
                  "model.img_size=32", "crops.global_size=32", "crops.local_size=16", "crops.n_local=4",
                  "train.batch_size=128"],
    "tiny-cpu": [],  # the recipe's own backbone and crops (tiny-cpu: dim 96, depth 3, patch 8, 2x32 + 2x16, batch 32)
    # the same network on 64-px photos: crops 2x64 + 2x32 (4x the tokens), blur scaled to the crop as tiny-cpu's is
    "tiny-cpu-64": ["model.img_size=64", "crops.global_size=64", "crops.local_size=32",
                    f"crops.blur_sigma_min={round(0.1 * 64 / 224, 4)}", f"crops.blur_sigma_max={round(2.0 * 64 / 224, 4)}"],
}
# The same work as Lightly's DINO step: DINO loss only, softmax centre, fp32 as the peer.
SAME_WORK = ["loss.ibot_weight=0", "loss.koleo_weight=0", "crops.mask_probability=0", "loss.centering=softmax_center",
             "train.precision=fp32"]
LIGHTLY_LR = 5e-4


# ----------------------------------------------------------------------------- images


def _to_rgb_images(arrays, size: int) -> list:
    """uint8 grey [N, h, w] -> N RGB PIL images of size x size (bicubic)."""
    return [Image.fromarray(a).convert("RGB").resize((size, size), Image.BICUBIC) for a in arrays]


def photo_tiles(tile: int = 48) -> list:
    """Non-overlapping tile x tile RGB crops of the photographs bundled with scikit-image (unlabelled)."""
    from dinolite.data.photos import sample_photos

    tiles = []
    for photo in sample_photos():
        array = np.asarray(photo)
        for y in range(0, array.shape[0] - tile + 1, tile):
            for x in range(0, array.shape[1] - tile + 1, tile):
                tiles.append(Image.fromarray(np.ascontiguousarray(array[y:y + tile, x:x + tile])))
    return tiles


def _split(images, labels, seed: int):
    """A shuffled 3:1 split: (train images, train labels, held-out images, held-out labels)."""
    order = np.random.default_rng(seed).permutation(len(images))
    cut = len(images) * 3 // 4
    train, test = order[:cut], order[cut:]
    return ([images[i] for i in train], torch.as_tensor(labels[train]),
            [images[i] for i in test], torch.as_tensor(labels[test]))


def _class_folders(root: str):
    """Images (RGB, loaded) and integer labels of root/<class>/* (classes in sorted order)."""
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    images, labels = [], []
    for label, cls in enumerate(classes):
        for name in sorted(os.listdir(os.path.join(root, cls))):
            if name.lower().endswith((".png", ".jpg", ".jpeg", ".bmp", ".webp")):
                with Image.open(os.path.join(root, cls, name)) as image:
                    images.append(image.convert("RGB"))
                labels.append(label)
    return images, np.array(labels), classes


def folder_set(path: str, seed: int = 0):
    """folder:PATH -> (train images, labels, held-out images, labels): PATH/train and PATH/val (or PATH/test)
    when they exist, else PATH's class folders split 3:1."""
    path = os.path.expanduser(path)
    held_out = next((os.path.join(path, d) for d in ("val", "test") if os.path.isdir(os.path.join(path, d))), None)
    if os.path.isdir(os.path.join(path, "train")) and held_out:
        train, train_labels, classes = _class_folders(os.path.join(path, "train"))
        test, test_labels, test_classes = _class_folders(held_out)
        if test_classes != classes:
            raise SystemExit(f"error: {path}: train/ and {os.path.basename(held_out)}/ have different class folders")
        result = (train, torch.as_tensor(train_labels), test, torch.as_tensor(test_labels))
    elif os.path.isdir(path):
        images, labels, classes = _class_folders(path)
        result = _split(images, labels, seed)
    else:
        raise SystemExit(f"error: {path} is not a folder; give folder:PATH with PATH/train/<class>/* and "
                         "PATH/val/<class>/* (e.g. from benchmarks/prepare_photos.py)")
    if len(classes) < 2 or min(len(result[0]), len(result[2])) == 0:
        raise SystemExit(f"error: {path} needs at least 2 class folders with images in train and held-out splits")
    return result


def labelled_set(name: str, size: int, seed: int = 0):
    """(train images, train labels, held-out images, held-out labels): a shuffled 3:1 split, or for
    "folder:PATH" the folder's own train / val split (see folder_set)."""
    if name.startswith("folder:"):
        return folder_set(name[len("folder:"):], seed)
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = _to_rgb_images((digits.images * (255 / 16)).round().astype(np.uint8), size)
        labels = digits.target
    elif name == "faces":
        import skimage.data

        faces = skimage.data.lfw_subset()  # 100 faces then 100 non-faces, floats in [0, 1]
        images = _to_rgb_images((faces * 255).round().astype(np.uint8), size)
        labels = np.array([0] * 100 + [1] * 100)
    elif name == "textures":
        from dinolite.data import SyntheticTextures

        data = SyntheticTextures(num_images=2000, image_size=size, seed=seed)
        images, labels = zip(*(data[i] for i in range(len(data))))
        labels = np.array(labels)
    else:
        raise ValueError(f"unknown labelled set {name!r}; choose digits, faces, textures or folder:PATH")
    return _split(images, labels, seed)


def training_images(name: str, size: int, seed: int = 0) -> list:
    if name == "photos":
        return photo_tiles()
    return labelled_set(name, size, seed)[0]


@torch.no_grad()
def knn_top1(features_of, knn_sets: dict) -> dict:
    """{set name: weighted kNN top-1 (%)} of the [CLS] features that features_of(images [N,3,S,S]) returns."""
    from dinolite.data import EvalTransform
    from dinolite.eval import knn_classify

    results = {}
    for name, (train_images, train_labels, test_images, test_labels) in knn_sets.items():
        transform = EvalTransform(resize_size=None, crop_size=None)
        feats = []
        for images in (train_images, test_images):
            x = torch.stack([transform(im) for im in images])
            feats.append(torch.cat([features_of(chunk) for chunk in x.split(256)]).float())
        results[name] = knn_classify(feats[0], train_labels, feats[1], test_labels, k=20, temperature=0.07)["top1"]
    return results


# ----------------------------------------------------------------------------- the two sides


def dinolite_config(args):
    from dinolite.train import apply_overrides, get_config

    overrides = SIZES[args.size] + (SAME_WORK if args.objective == "same" else [])
    if args.batch:
        overrides.append(f"train.batch_size={args.batch}")
    overrides += list(getattr(args, "set", None) or [])  # --set key=value, after the size and objective
    return apply_overrides(get_config(args.recipe), overrides + ["train.num_workers=1", "train.threads=1",
                                                                 f"train.seed={args.seed}"])


class DinoliteSide:
    name = "dinolite"

    def __init__(self, args, images, horizon: int):
        from dinolite.train import DINOv2MetaArch, build_optimizer
        from dinolite.train.data import StepBatches
        from dinolite.train.run import make_autocast, one_thread_worker
        from dinolite.train.precision import resolve_precision

        self.cfg = cfg = dinolite_config(args)
        torch.manual_seed(args.seed)
        self.arch = DINOv2MetaArch(cfg)
        self.optimizer = build_optimizer(self.arch.student, cfg)
        self.precision = resolve_precision(cfg.train.precision, torch.device("cpu"), cfg)  # auto: probed at this shape
        self.autocast = make_autocast(torch.device("cpu"), self.precision)
        self.set_horizon(horizon)
        # a loader over far more steps than the budget allows; the loop stops on the clock
        batches = StepBatches(images, cfg, total_steps=10 ** 7)
        self.loader = iter(torch.utils.data.DataLoader(batches, batch_size=None, num_workers=args.workers,
                                                       worker_init_fn=one_thread_worker))

    def set_horizon(self, horizon: int):
        """The schedules span `horizon` steps, in the recipe's number of epochs."""
        self.epoch_length = max(1, horizon // self.cfg.train.epochs)
        self.total_steps = self.epoch_length * self.cfg.train.epochs

    def step(self, step: int):
        from dinolite.train import train_step
        from dinolite.train.optim import schedule_values

        batch = next(self.loader)
        values = schedule_values(self.cfg, min(step, self.total_steps - 1), self.total_steps, self.epoch_length,
                                 self.cfg.train.batch_size)
        train_step(self.arch, self.optimizer, batch, step, values, seed=self.cfg.train.seed,
                   clip_grad=self.cfg.optim.clip_grad, autocast=self.autocast)

    def modules(self):
        return [self.arch, self.optimizer]

    def features(self, images):
        return self.arch.teacher.backbone(images)


class Views(torch.utils.data.Dataset):
    """Lightly's side of the data: image i -> the list of its views."""

    def __init__(self, images, transform):
        self.images, self.transform = images, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i])


class LightlySide:
    name = "Lightly"

    def __init__(self, args, images, horizon: int):
        import timm
        from lightly.loss import DINOLoss
        from lightly.models.modules import DINOProjectionHead
        from lightly.models.utils import deactivate_requires_grad
        from lightly.transforms.dino_transform import DINOTransform

        cfg = dinolite_config(args)  # for the shapes only: backbone, head sizes, crops, batch
        m, h, c = cfg.model, cfg.head, cfg.crops
        torch.manual_seed(args.seed)
        self.student_backbone = timm.models.vision_transformer.VisionTransformer(
            img_size=m.img_size, patch_size=m.patch_size, embed_dim=m.embed_dim, depth=m.depth,
            num_heads=m.num_heads, mlp_ratio=m.ffn_ratio, num_classes=0, dynamic_img_size=True)
        k = getattr(args, "lightly_k", 0) or h.dino_out_dim
        self.student_head = DINOProjectionHead(m.embed_dim, h.hidden_dim, h.bottleneck_dim, k, freeze_last_layer=1)
        self.teacher_backbone = copy.deepcopy(self.student_backbone)
        self.teacher_head = DINOProjectionHead(m.embed_dim, h.hidden_dim, h.bottleneck_dim, k)
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_head)
        self.teacher_backbone.eval()
        self.criterion = DINOLoss(output_dim=k)
        params = list(self.student_backbone.parameters()) + list(self.student_head.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=LIGHTLY_LR, weight_decay=0.04, foreach=True)
        transform = DINOTransform(
            global_crop_size=c.global_size, global_crop_scale=(c.global_scale_min, 1.0),
            local_crop_size=c.local_size, local_crop_scale=(c.local_scale_min, c.local_scale_max),
            n_local_views=c.n_local, sigmas=(c.blur_sigma_min, c.blur_sigma_max))
        loader = torch.utils.data.DataLoader(Views(images, transform), batch_size=cfg.train.batch_size, shuffle=True, drop_last=True,
                                             num_workers=args.workers, persistent_workers=args.workers > 0,
                                             generator=torch.Generator().manual_seed(args.seed))
        self.loader = self._forever(loader)
        self.epoch_length = max(1, len(images) // cfg.train.batch_size)
        self.set_horizon(horizon)

    @staticmethod
    def _forever(loader):
        while True:
            yield from loader

    def set_horizon(self, horizon: int):
        self.total_steps = max(horizon, 1)

    def step(self, step: int):
        from lightly.models.utils import update_momentum
        from lightly.utils.scheduler import cosine_schedule

        views = next(self.loader)
        momentum = cosine_schedule(min(step, self.total_steps - 1), self.total_steps, 0.996, 1.0)
        update_momentum(self.student_backbone, self.teacher_backbone, m=momentum)
        update_momentum(self.student_head, self.teacher_head, m=momentum)
        self.student_backbone.train()
        teacher_out = [self.teacher_head(self.teacher_backbone(view)) for view in views[:2]]
        student_out = [self.student_head(self.student_backbone(view)) for view in views]
        loss = self.criterion(teacher_out, student_out, epoch=step // self.epoch_length)
        loss.backward()
        self.student_head.cancel_last_layer_gradients(current_epoch=step // self.epoch_length)
        self.optimizer.step()
        self.optimizer.zero_grad()

    def modules(self):
        return [self.student_backbone, self.student_head, self.teacher_backbone, self.teacher_head,
                self.criterion, self.optimizer]

    def features(self, images):
        self.teacher_backbone.eval()
        return self.teacher_backbone(images)


# ----------------------------------------------------------------------------- one process per side


def run_side(side_name: str, args, barrier, results):
    """One side in its own process (see train_and_measure); the pair waits for each other at each phase."""
    try:
        torch.set_num_threads(1)
        images, knn_sets = prepare_data(args, dinolite_config(args).crops.global_size)
        results[side_name] = train_and_measure(side_name, args, images, knn_sets, barrier.wait)
    except BaseException:
        barrier.abort()  # the other side stops waiting
        raise


def prepare_data(args, size: int):
    """(training images, {name: (train images, labels, held-out images, labels)} for kNN)."""
    knn_names = args.knn or (["digits"] if args.data == "photos" else [args.data])
    knn_sets = {name: labelled_set(name, size, args.seed) for name in knn_names}
    images = knn_sets[args.data][0] if args.data in knn_sets else training_images(args.data, size, args.seed)
    return images, knn_sets


def train_and_measure(side_name: str, args, images, knn_sets: dict, wait=lambda: None) -> dict:
    """kNN at init, training for args.steps steps (or args.budget seconds, the schedules' length calibrated
    on a 3-step throwaway probe), kNN at the end. `wait` synchronises the phases with the other side."""
    side = (DinoliteSide if side_name == "dinolite" else LightlySide)(args, images, horizon=args.steps or 1000)
    with torch.no_grad():
        before = knn_top1(side.features, knn_sets)
    wait()
    if args.steps:
        horizon = args.steps
    else:  # calibrate the schedules' length on a throwaway copy (its steps do not count)
        initial = [copy.deepcopy(module.state_dict()) for module in side.modules()]
        probe_times = []
        for s in range(3):
            tic = time.perf_counter()
            side.step(s)
            probe_times.append(time.perf_counter() - tic)
        for module, state in zip(side.modules(), initial):  # back to the initial weights and optimiser state
            module.load_state_dict(state)
        horizon = max(10, int(args.budget / statistics.median(probe_times[1:])))
    side.set_horizon(horizon)
    wait()
    times, cpu_times, start, step = [], [], time.perf_counter(), 0
    report_every = max(1, (args.steps or horizon) // 10)
    curve_every, curve = getattr(args, "curve_every", 0), [(0, before)]
    while (step < args.steps) if args.steps else (time.perf_counter() - start < args.budget):
        tic, cpu_tic = time.perf_counter(), time.process_time()
        side.step(step)
        times.append(time.perf_counter() - tic)
        cpu_times.append(time.process_time() - cpu_tic)  # this process only: not its data worker
        step += 1
        if curve_every and step % curve_every == 0 and step < (args.steps or horizon):
            with torch.no_grad():  # outside the timed step; the teacher has no dropout, so training is unchanged
                curve.append((step, knn_top1(side.features, knn_sets)))
                print(f"  {side_name}: step {step} kNN " + ", ".join(f"{k} {v:.2f}" for k, v in curve[-1][1].items()),
                      flush=True)
        if step % report_every == 0 and getattr(args, "progress", True):
            print(f"  {side_name}: step {step}/{args.steps or horizon}, {statistics.median(times[-report_every:]):.3f} s/step",
                  flush=True)
    wait()
    with torch.no_grad():
        after = knn_top1(side.features, knn_sets)
    if getattr(args, "save", "") and side_name == "dinolite":  # the trained teacher backbone, fp16
        torch.save({k: v.half() for k, v in side.arch.teacher.backbone.state_dict().items()}, args.save)
    return dict(steps=step, times=times, cpu_times=cpu_times, horizon=horizon, knn_before=before,
                knn_after=after, precision=getattr(side, "precision", "fp32"), curve=curve + [(step, after)])


def quartiles(values):
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return q[0], statistics.median(values), q[2]


def spread(values) -> str:
    """"mean +- sample std (min..max)" of a list of numbers."""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f} ({min(values):.2f}..{max(values):.2f})"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=list(SIZES), default="vit-tiny4")
    p.add_argument("--recipe", default="small-photos", help="dinolite recipe (get_config name or YAML)")
    p.add_argument("--objective", choices=["same", "dinov2"], default="same")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="more dinolite config overrides (after --size and --objective), e.g. head.dino_out_dim=4096")
    p.add_argument("--data", default="photos",
                   help="photos, digits, faces, textures, or folder:PATH (PATH/train and PATH/val class folders)")
    p.add_argument("--knn", nargs="*", help="labelled sets for kNN (digits, faces, textures, folder:PATH; "
                   "default: the training set; digits for photos)")
    p.add_argument("--budget", type=float, default=120.0, help="training seconds per side (concurrent)")
    p.add_argument("--steps", type=int, default=0,
                   help="train each side for exactly this many steps instead of --budget seconds (equal work)")
    p.add_argument("--batch", type=int, default=0, help="override the batch size (0: the size's)")
    p.add_argument("--lightly-k", type=int, default=0, help="Lightly's prototypes (0: dinolite's head.dino_out_dim)")
    p.add_argument("--workers", type=int, default=1, help="data workers per side")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="run the pair once per seed (initialisation, data order, augmentations); "
                        "more than one prints the mean and spread")
    args = p.parse_args()
    for name in [args.data] + (args.knn or []):
        if name not in ("photos", "digits", "faces", "textures") and not name.startswith("folder:"):
            p.error(f"unknown data {name!r}: choose photos, digits, faces, textures or folder:PATH")
        if name.startswith("folder:") and not os.path.isdir(os.path.expanduser(name[len("folder:"):])):
            p.error(f"{name[len('folder:'):]} is not a folder; give folder:PATH with PATH/train/<class>/* and "
                    "PATH/val/<class>/* (benchmarks/prepare_photos.py builds Imagenette so)")
    if args.steps < 0:
        p.error("--steps must be >= 0 (0: train for --budget seconds)")
    args.seed = args.seeds[0]
    try:
        cfg = dinolite_config(args)
    except ValueError as e:
        p.error(str(e))
    m, c = cfg.model, cfg.crops
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"AVX512-BF16 {torch.cpu._is_avx512_bf16_supported()}, AMX {torch.cpu._is_amx_tile_supported()}")
    length = f"{args.steps} steps" if args.steps else f"budget {args.budget:g} s"
    print(f"ViT dim {m.embed_dim} depth {m.depth} heads {m.num_heads} patch {m.patch_size}; crops 2x{c.global_size} + "
          f"{c.n_local}x{c.local_size}; batch {cfg.train.batch_size}; dinolite recipe {args.recipe}, objective "
          f"{args.objective}, precision {cfg.train.precision}, K {cfg.head.dino_out_dim}; Lightly K "
          f"{args.lightly_k or cfg.head.dino_out_dim}; data {args.data}; {length} per side, "
          f"one thread and {args.workers} data worker(s) each, both sides at once; seeds {args.seeds}")
    ratios, cpu_ratios, per_side, ctx = [], [], {"dinolite": [], "Lightly": []}, mp.get_context("spawn")
    for seed in args.seeds:
        args.seed = seed
        with ctx.Manager() as manager:
            results, barrier = manager.dict(), manager.Barrier(2)
            procs = [ctx.Process(target=run_side, args=(name, args, barrier, results)) for name in ("dinolite", "Lightly")]
            for proc in procs:
                proc.start()
            for proc in procs:
                proc.join()
            if set(results.keys()) != {"dinolite", "Lightly"}:
                raise SystemExit(f"a side failed (exit codes {[proc.exitcode for proc in procs]})")
            results = dict(results)
        for name in ("dinolite", "Lightly"):
            r = results[name]
            per_side[name].append(r)
            q1, med, q3 = quartiles(r["times"][1:] or r["times"])
            knn = ", ".join(f"{k} {r['knn_before'][k]:.2f} -> {r['knn_after'][k]:.2f} "
                            f"({r['knn_after'][k] - r['knn_before'][k]:+.2f})" for k in r["knn_before"])
            print(f"[seed {seed}] {name:>8} ({r['precision']}): {r['steps']:5d} steps, {med:.3f} s/step (quartiles "
                  f"{q1:.3f}-{q3:.3f}; schedules over {r['horizon']} steps); kNN top-1 init -> end (gain): {knn}")
        medians = {key: [statistics.median(results[name][key][1:] or results[name][key]) for name in ("dinolite", "Lightly")]
                   for key in ("times", "cpu_times")}
        ratios.append(medians["times"][0] / medians["times"][1])
        cpu_ratios.append(medians["cpu_times"][0] / medians["cpu_times"][1])
        print(f"[seed {seed}] step time dinolite/Lightly: {ratios[-1]:.3f} (wall clock, data waits included); "
              f"CPU time of the training processes: {medians['cpu_times'][0]:.3f} / {medians['cpu_times'][1]:.3f} s "
              f"= {cpu_ratios[-1]:.3f}")
    if len(args.seeds) > 1:
        print(f"over {len(args.seeds)} seeds (mean +- std (min..max)):")
        for name, runs in per_side.items():
            for k in runs[0]["knn_before"]:
                init = [r["knn_before"][k] for r in runs]
                end = [r["knn_after"][k] for r in runs]
                print(f"  {name:>8} kNN {k}: init {spread(init)}, end {spread(end)}, "
                      f"gain {spread([e - i for e, i in zip(end, init)])}")
        print(f"  step time dinolite/Lightly: wall {spread(ratios)}, CPU {spread(cpu_ratios)}")


if __name__ == "__main__":
    main()
