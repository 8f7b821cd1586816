"""Forward + backward time of dinolite's ViT-S/14 against timm's vit_small_patch14_dinov2.

Both models: 384 dim, 12 blocks, 6 heads, MLP 4x, LayerScale 1e-5, no registers, img_size 224, random
weights. Repeats are interleaved (dinolite, timm, dinolite, ...) so that load changes on a shared
machine hit both; the median is reported per model and precision (fp32, bf16 autocast).

    python benchmarks/vit.py [--batch 16] [--repeats 3] [--size 224] [--device cpu|cuda]
"""
import argparse
import statistics
import time

import timm  # only the benchmark uses timm
import torch

from dinolite.models import vit_small


def step_time(model, images, dtype) -> float:
    """Seconds for one forward + backward of the summed CLS feature."""
    if images.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
        features = model(images)
    features.float().sum().backward()
    if images.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    device = torch.device(args.device)
    contenders = {
        "dinolite": vit_small(img_size=args.size, layerscale_init=1e-5).to(device).train(),
        # num_classes=0: timm's forward then returns the normalised CLS token, like ours
        "timm": timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=args.size,
                                  num_classes=0).to(device).train(),
    }
    for name, model in contenders.items():
        print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    print(f"device {device}, batch {args.batch} at {args.size}px, {args.repeats} interleaved repeats "
          f"(+1 warm-up), {torch.get_num_threads()} threads")

    for label, dtype in (("fp32", None), ("bf16 autocast", torch.bfloat16)):
        times = {name: [] for name in contenders}
        for repeat in range(args.repeats + 1):
            for name, model in contenders.items():
                model.zero_grad(set_to_none=True)
                seconds = step_time(model, images, dtype)
                if repeat > 0:  # the first round warms up allocators and kernels
                    times[name].append(seconds)
        medians = {name: statistics.median(t) for name, t in times.items()}
        print(f"{label:>14}: dinolite {medians['dinolite']:.3f} s, timm {medians['timm']:.3f} s, "
              f"ratio dinolite/timm {medians['dinolite'] / medians['timm']:.3f}")


if __name__ == "__main__":
    main()
