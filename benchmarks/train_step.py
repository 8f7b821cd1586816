"""Benchmark one full DINOv2 training step and the packed multi-crop forward.

    python benchmarks/train_step.py                       # ViT-S/14, 2x224 + 8x98 crops, batch 8, bf16
    python benchmarks/train_step.py --batch 2 --depth 4   # shrink for a slow machine

A step = student multi-crop forward/backward (masked globals + locals in one backbone pass),
teacher forward, DINO and iBOT heads, DINO + iBOT + KoLeo losses, AdamW, EMA update.
Reports images/s and achieved GFLOP/s (FLOPs counted by torch.utils.flop_counter over the
step) as a fraction of the bf16 matmul peak measured in the same run, and the speed of
packed (forward_features_list) vs separate per-resolution forwards of the student backbone.
"""
import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from dinolite.train import DINOv2MetaArch, apply_overrides, build_optimizer, get_config, train_step
from dinolite.train.data import StepBatches
from dinolite.train.run import make_autocast
from dinolite.train.optim import StepValues


def timed(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall time of fn() over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak(dtype, device, n: int = 2048, repeats: int = 5) -> float:
    """Achieved FLOP/s of an n x n x n matmul in `dtype`: the practical peak of this machine."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / timed(lambda: a @ b, repeats)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8, help="images per step")
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=98)
    p.add_argument("--n-local", type=int, default=8)
    p.add_argument("--out-dim", type=int, default=65536, help="prototypes K of each head")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)

    cfg = apply_overrides(get_config("vitb14-imagenet"), [
        "model.embed_dim=384", "model.num_heads=6", f"model.depth={args.depth}", "model.patch_size=14",
        "model.drop_path_rate=0.1", f"head.dino_out_dim={args.out_dim}", f"head.ibot_out_dim={args.out_dim}",
        "head.share_heads=false", f"crops.global_size={args.global_size}", f"crops.local_size={args.local_size}",
        f"crops.n_local={args.n_local}", f"train.batch_size={args.batch}", f"train.precision={args.precision}",
    ])
    autocast = make_autocast(device, args.precision)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32

    class Images(torch.utils.data.Dataset):  # random photos-sized images: content does not matter here
        def __len__(self):
            return args.batch

        def __getitem__(self, i):
            return torch.rand(3, args.global_size + 32, args.global_size + 32, generator=torch.Generator().manual_seed(i))

    batch = StepBatches(Images(), cfg, total_steps=1)[0]
    batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    torch.manual_seed(0)
    arch = DINOv2MetaArch(cfg, device=device)
    optimizer = build_optimizer(arch.student, cfg)
    values = StepValues(lr=1e-4, last_layer_lr=1e-4, weight_decay=0.04, momentum=0.994, teacher_temp=0.05)
    n_params = sum(p.numel() for p in arch.student.parameters())
    print(f"device {device}, precision {args.precision}, threads {torch.get_num_threads()}, "
          f"ViT-S/14 depth {args.depth}, batch {args.batch}: 2x{args.global_size} + {args.n_local}x{args.local_size} "
          f"crops, K={args.out_dim}, student {n_params / 1e6:.1f} M parameters")

    step = lambda: train_step(arch, optimizer, batch, 0, values, autocast=autocast)  # noqa: E731
    step()  # warm-up (allocations, AdamW state)
    with FlopCounterMode(display=False) as counter:
        step()
    step_flops = counter.get_total_flops()
    peak = matmul_peak(dtype, device)
    step_time = timed(step, args.repeats, warmup=0)
    achieved = step_flops / step_time
    print(f"{args.precision} matmul peak (2048^3):  {peak / 1e9:8.1f} GFLOP/s")
    print(f"full training step:          {step_time:8.2f} s   {args.batch / step_time:7.2f} images/s   "
          f"{step_flops / 1e9:8.1f} GFLOP/step   {achieved / 1e9:7.1f} GFLOP/s = {100 * achieved / peak:5.1f}% of peak")

    # Packed vs separate multi-crop forward + backward of the student backbone.
    backbone = arch.student.backbone
    g, l, masks = batch["global_crops"], batch["local_crops"], batch["masks"]

    def packed():
        with autocast():
            outs = backbone.forward_features_list([g, l], [masks, None])
            loss = sum(o["x_norm_clstoken"].float().sum() + o["x_norm_patchtokens"].float().sum() for o in outs)
        loss.backward()

    def separate():
        with autocast():
            outs = [backbone.forward_features(g, masks), backbone.forward_features(l)]
            loss = sum(o["x_norm_clstoken"].float().sum() + o["x_norm_patchtokens"].float().sum() for o in outs)
        loss.backward()

    t_packed = timed(packed, args.repeats)
    t_separate = timed(separate, args.repeats)
    print(f"student backbone fwd+bwd:    packed {t_packed:.2f} s, separate {t_separate:.2f} s, "
          f"packed speed-up {t_separate / t_packed:.2f}x")


if __name__ == "__main__":
    main()
