"""dinolite against Lightly's DINO, side by side: step time and kNN on real images, one thread each.

    pip install -e ".[bench]"                                   # lightly, timm, scikit-learn
    python benchmarks/vs_lightly.py                             # ViT-tiny/4, 2x32 + 4x16 crops, batch 128
    python benchmarks/vs_lightly.py --size tiny-cpu --data digits --budget 300 --objective dinov2

Both sides train the same backbone shape (dinolite's VisionTransformer; a timm VisionTransformer for
Lightly) on the same images with the same crops (sizes, counts, scales, blur sigmas) and batch, as two
processes that run at the same time, one compute thread and one data worker each, for the same
wall-clock budget (--budget seconds). Printed: each side's steps and s/step (median and quartiles,
data loading included), the ratio dinolite/Lightly of the median step times, and each side's teacher
kNN (weighted, k 20, T 0.07) at initialisation and at the end.

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

What it does not measure: multi-process or GPU speed, accuracy after long training, and any other
Lightly configuration (other backbones, other transforms): see README "dinolite vs Lightly".
"""
import argparse
import copy
import math
import multiprocessing as mp
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


def labelled_set(name: str, size: int, seed: int = 0):
    """(train images, train labels, held-out images, held-out labels): a shuffled 3:1 split."""
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
        raise ValueError(f"unknown labelled set {name!r}; choose digits, faces or textures")
    order = np.random.default_rng(seed).permutation(len(images))
    cut = len(images) * 3 // 4
    train, test = order[:cut], order[cut:]
    return ([images[i] for i in train], torch.as_tensor(labels[train]),
            [images[i] for i in test], torch.as_tensor(labels[test]))


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
    return apply_overrides(get_config(args.recipe), overrides + ["train.num_workers=1", "train.threads=1"])


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
        self.student_head = DINOProjectionHead(m.embed_dim, h.hidden_dim, h.bottleneck_dim, h.dino_out_dim,
                                               freeze_last_layer=1)
        self.teacher_backbone = copy.deepcopy(self.student_backbone)
        self.teacher_head = DINOProjectionHead(m.embed_dim, h.hidden_dim, h.bottleneck_dim, h.dino_out_dim)
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_head)
        self.teacher_backbone.eval()
        self.criterion = DINOLoss(output_dim=h.dino_out_dim)
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
    """One side in its own process: kNN at init, a 2-step calibration, `budget` seconds of training, kNN."""
    try:
        _run_side(side_name, args, barrier, results)
    except BaseException:
        barrier.abort()  # the other side stops waiting
        raise


def _run_side(side_name: str, args, barrier, results):
    torch.set_num_threads(1)
    cfg = dinolite_config(args)
    size = cfg.crops.global_size
    images = training_images(args.data, size, args.seed)
    knn_names = args.knn or (["digits"] if args.data == "photos" else [args.data])
    knn_sets = {name: labelled_set(name, size, args.seed) for name in knn_names}
    side = (DinoliteSide if side_name == "dinolite" else LightlySide)(args, images, horizon=1000)
    with torch.no_grad():
        before = knn_top1(side.features, knn_sets)
    # Calibrate the schedules' length on a throwaway copy (its steps do not count).
    barrier.wait()
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
    barrier.wait()
    times, cpu_times, start, step = [], [], time.perf_counter(), 0
    while time.perf_counter() - start < args.budget:
        tic, cpu_tic = time.perf_counter(), time.process_time()
        side.step(step)
        times.append(time.perf_counter() - tic)
        cpu_times.append(time.process_time() - cpu_tic)  # this process only: not its data worker
        step += 1
    barrier.wait()
    with torch.no_grad():
        after = knn_top1(side.features, knn_sets)
    results[side_name] = dict(steps=step, times=times, cpu_times=cpu_times, horizon=horizon, knn_before=before,
                              knn_after=after, precision=getattr(side, "precision", "fp32"))


def quartiles(values):
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return q[0], statistics.median(values), q[2]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=list(SIZES), default="vit-tiny4")
    p.add_argument("--recipe", default="small-photos", help="dinolite recipe (get_config name or YAML)")
    p.add_argument("--objective", choices=["same", "dinov2"], default="same")
    p.add_argument("--data", choices=["photos", "digits", "faces", "textures"], default="photos")
    p.add_argument("--knn", nargs="*", choices=["digits", "faces", "textures"],
                   help="labelled sets for kNN (default: the training set; digits for photos)")
    p.add_argument("--budget", type=float, default=120.0, help="training seconds per side (concurrent)")
    p.add_argument("--batch", type=int, default=0, help="override the batch size (0: the size's)")
    p.add_argument("--workers", type=int, default=1, help="data workers per side")
    p.add_argument("--repeats", type=int, default=1, help="run the pair this many times")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    cfg = dinolite_config(args)
    m, c = cfg.model, cfg.crops
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"AVX512-BF16 {torch.cpu._is_avx512_bf16_supported()}, AMX {torch.cpu._is_amx_tile_supported()}")
    print(f"ViT dim {m.embed_dim} depth {m.depth} heads {m.num_heads} patch {m.patch_size}; crops 2x{c.global_size} + "
          f"{c.n_local}x{c.local_size}; batch {cfg.train.batch_size}; dinolite recipe {args.recipe}, objective "
          f"{args.objective}, precision {cfg.train.precision}; data {args.data}; budget {args.budget:g} s per side, "
          "one thread and one data worker each, both sides at once")
    ratios, ctx = [], mp.get_context("spawn")
    for repeat in range(args.repeats):
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
            q1, med, q3 = quartiles(r["times"][1:] or r["times"])
            knn = ", ".join(f"{k} {r['knn_before'][k]:.1f} -> {r['knn_after'][k]:.1f}" for k in r["knn_before"])
            print(f"[{repeat}] {name:>8} ({r['precision']}): {r['steps']:5d} steps, {med:.3f} s/step (quartiles {q1:.3f}-{q3:.3f}; "
                  f"schedules over {r['horizon']} steps); kNN top-1 init -> end: {knn}")
        medians = {key: [statistics.median(results[name][key][1:] or results[name][key]) for name in ("dinolite", "Lightly")]
                   for key in ("times", "cpu_times")}
        ratio = medians["times"][0] / medians["times"][1]
        ratios.append(ratio)
        print(f"[{repeat}] step time dinolite/Lightly: {ratio:.3f} (wall clock, data waits included); "
              f"CPU time of the training processes: {medians['cpu_times'][0]:.3f} / {medians['cpu_times'][1]:.3f} s "
              f"= {medians['cpu_times'][0] / medians['cpu_times'][1]:.3f}")
    if len(ratios) > 1:
        print(f"ratio over {len(ratios)} runs: median {statistics.median(ratios):.3f}, "
              f"min {min(ratios):.3f}, max {max(ratios):.3f}")


if __name__ == "__main__":
    main()
