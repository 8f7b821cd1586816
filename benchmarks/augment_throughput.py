"""Images/s of one data-loading worker at ViT-S/16 sizes: JPEG decode + MultiCropAugmentation (2 x 224 px global,
8 x 96 px local crops), one thread, as a DataLoader worker runs it (dinolite.train.run.one_thread_worker).

    python benchmarks/augment_throughput.py [--images 30] [--size 500x375]

Prints ms per image (decode and augment separately) and images/s per worker. A GPU step needs
(images/s of the GPU) / (images/s per worker) workers; see README "Feeding a GPU".
"""
import argparse
import io
import time

import numpy as np
import torch
from PIL import Image

from dinolite.data import MultiCropAugmentation


def jpeg_bytes(width: int, height: int, seed: int) -> bytes:
    """A smooth random photo-like image (JPEG, quality 90), the size of a typical ImageNet image."""
    rng = np.random.default_rng(seed)
    small = rng.uniform(0, 255, (height // 16 + 1, width // 16 + 1, 3)).astype(np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.BICUBIC)
    noise = rng.normal(0, 8, (height, width, 3))
    image = Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=30)
    parser.add_argument("--size", default="500x375", help="WIDTHxHEIGHT of the source images")
    args = parser.parse_args()
    torch.set_num_threads(1)
    width, height = (int(v) for v in args.size.split("x"))
    files = [jpeg_bytes(width, height, seed) for seed in range(args.images)]
    augment = MultiCropAugmentation(global_size=224, local_size=96, n_local=8)
    gen = torch.Generator().manual_seed(0)
    augment(Image.open(io.BytesIO(files[0])).convert("RGB"), generator=gen)  # warm-up
    decode = transform = 0.0
    cpu_start = time.process_time()  # CPU seconds: what a worker with a core of its own would take
    for data in files:
        t0 = time.perf_counter()
        image = Image.open(io.BytesIO(data)).convert("RGB")
        t1 = time.perf_counter()
        augment(image, generator=gen)
        t2 = time.perf_counter()
        decode, transform = decode + t1 - t0, transform + t2 - t1
    n = len(files)
    per_image = (decode + transform) / n
    cpu_per_image = (time.process_time() - cpu_start) / n
    print(f"{width}x{height} JPEG, 2 x 224 + 8 x 96 crops, 1 thread: decode {1e3 * decode / n:.1f} ms, "
          f"augment {1e3 * transform / n:.1f} ms per image (wall) -> {1 / per_image:.1f} images/s per worker; "
          f"CPU time {1e3 * cpu_per_image:.1f} ms per image -> {1 / cpu_per_image:.1f} images/s per free core")


if __name__ == "__main__":
    main()
