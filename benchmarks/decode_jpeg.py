"""Images/s of one data worker (decode + multi-crop augmentation) on a JPEG folder, whole vs reduced-size decoding.

    python benchmarks/decode_jpeg.py --folder ~/photos                    # tiny-cpu's crops (32 / 16 px)
    python benchmarks/decode_jpeg.py --folder ~/photos --config vits16-imagenette-1gpu --images 64
    python benchmarks/decode_jpeg.py --folder ~/photos --camera 3000      # also on copies scaled to 3000 px wide

A DataLoader worker does, per image: decode the JPEG, then the multi-crop augmentation (crops, colour, blur).
"whole" decodes every pixel (ImageFolderDataset's default); "reduced" lets PIL decode at 1/2, 1/4 or 1/8 size
when the shorter side stays >= dinolite.train.data.decode_side(cfg), which is what training does. One process,
one thread, the same images in the same order; the median of --repeats passes.
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from dinolite.data import ImageFolderDataset
from dinolite.train import get_config
from dinolite.train.data import build_augmentation, decode_side


def images_per_second(dataset, augmentation, count: int, repeats: int) -> float:
    rates = []
    for _ in range(repeats):
        tic = time.perf_counter()
        for i in range(count):
            augmentation(dataset[i][0])
        rates.append(count / (time.perf_counter() - tic))
    return statistics.median(rates)


def camera_copies(dataset, count: int, width: int, folder: Path) -> Path:
    """JPEG copies (quality 90) of the first images, scaled up to `width` pixels wide like a phone's photos."""
    for i in range(count):
        path = dataset.samples[i][0]
        with Image.open(path) as image:
            image = image.convert("RGB")
            height = round(image.height * width / image.width)
            image.resize((width, height), Image.Resampling.BICUBIC).save(folder / f"{i}.jpg", quality=90)
    return folder


def measure(folder, cfg, count, repeats) -> dict:
    dataset = ImageFolderDataset(folder, verify=False)
    count = min(count, len(dataset))
    augmentation = build_augmentation(cfg)
    sizes = [Image.open(dataset.samples[i][0]).size for i in range(count)]
    out = {"images": count, "median_size": sorted(sizes)[len(sizes) // 2], "decode_side": decode_side(cfg)}
    for name, side in (("whole", 0), ("reduced", decode_side(cfg))):
        dataset.draft_side = side
        torch.manual_seed(0)
        out[name] = images_per_second(dataset, augmentation, count, repeats)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", required=True, help="a folder of JPEGs (searched recursively)")
    parser.add_argument("--config", default="tiny-cpu")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--camera", type=int, default=0, help="also measure copies scaled to this width (px)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = get_config(args.config)
    rows = [("as given", measure(args.folder, cfg, args.images, args.repeats))]
    if args.camera:
        with tempfile.TemporaryDirectory() as tmp:
            source = ImageFolderDataset(args.folder, verify=False)
            camera_copies(source, min(args.images, len(source)), args.camera, Path(tmp))
            rows.append((f"scaled to {args.camera} px wide", measure(tmp, cfg, args.images, args.repeats)))
    print(f"{args.config}: crops {cfg.crops.global_size}/{cfg.crops.local_size} px, decode side {decode_side(cfg)} px")
    print("| images | median size | whole decode (img/s) | reduced decode (img/s) | speed-up |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in rows:
        print(f"| {name} ({r['images']}) | {r['median_size'][0]} x {r['median_size'][1]} | {r['whole']:.1f} | "
              f"{r['reduced']:.1f} | {r['reduced'] / r['whole']:.1f}x |")


if __name__ == "__main__":
    main()
