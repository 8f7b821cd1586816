"""Build the photo development set: Imagenette resized to small square images, one folder per class.

    python benchmarks/prepare_photos.py                               # 32 and 64 px under ~/data/photos
    python benchmarks/prepare_photos.py --src RAW --out OUT --sizes 32 64 96
    python benchmarks/prepare_photos.py --src ~/data/imagewoof_raw --name imagewoof     # the second set

Source: Imagenette (fast.ai), a 10-class subset of ImageNet (tench, English springer, cassette player,
chain saw, church, French horn, garbage truck, gas pump, golf ball, parachute; WordNet ids n01440764 ...).
The copy used here is the one in the public GitHub repository thunderInfy/imagenette, extracted to
RAW/{train,val}/<wnid>/*.JPEG (9,469 train and 3,925 val images, 224 x 224 there). The images are
ImageNet's, under ImageNet's terms: for research, not redistributed here.

The second set, for confirming what the first one suggests: Imagewoof (fast.ai), 10 dog breeds of ImageNet
(Shih-Tzu, Rhodesian ridgeback, beagle, English foxhound, Border terrier, Australian terrier, golden
retriever, Old English sheepdog, Samoyed, dingo; none of them an Imagenette class), a fine-grained task,
from the public GitHub repository thunderInfy/imagewoof (commit 6338aee; 9,025 train and 3,929 val images,
224 x 224, the same layout). Both sets come from ImageNet, so they share its photographic statistics; CIFAR-10
is kept out of development on purpose (reserved for independent checks).

Output: OUT/imagenette<S>/{train,val}/<wnid>/<name>.png for each size S, usable as `--data folder:PATH`
(each subfolder a class). Each image is converted to RGB, its shorter side resized to S with Pillow's
antialiased bicubic filter (reducing_gap off: an exact resample), then centre-cropped to S x S. PNG, so the
small images are not re-compressed. Existing outputs are kept (rerunning only fills what is missing).

Not committed, not used by CI or the tests: it needs the raw images, which are not in the repository.
"""
import argparse
import os
import sys

from PIL import Image

SPLITS = ("train", "val")
EXTENSIONS = (".jpeg", ".jpg", ".png")


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """RGB image -> size x size: shorter side to `size` (antialiased bicubic), then the centre square."""
    image = image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((new_w, new_h), Image.BICUBIC)  # Pillow's resize filters antialias when downscaling
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", default="~/data/imagenette_raw", help="folder with train/ and val/ class folders")
    p.add_argument("--out", default="~/data/photos", help="where imagenette<S>/ folders are written")
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    p.add_argument("--name", default="imagenette", help="output folder prefix")
    args = p.parse_args()
    args.src, args.out = os.path.expanduser(args.src), os.path.expanduser(args.out)
    if not all(os.path.isdir(os.path.join(args.src, s)) for s in SPLITS):
        print(f"error: {args.src} has no train/ and val/ folders; give --src the extracted Imagenette "
              "(train/<wnid>/*.JPEG, val/<wnid>/*.JPEG)", file=sys.stderr)
        sys.exit(2)
    jobs = []
    for split in SPLITS:
        for cls in sorted(os.listdir(os.path.join(args.src, split))):
            folder = os.path.join(args.src, split, cls)
            if os.path.isdir(folder):
                jobs += [(split, cls, os.path.join(folder, f)) for f in sorted(os.listdir(folder))
                         if f.lower().endswith(EXTENSIONS)]
    counts = {}
    for i, (split, cls, path) in enumerate(jobs):
        stem = os.path.splitext(os.path.basename(path))[0]
        outs = {size: os.path.join(args.out, f"{args.name}{size}", split, cls, stem + ".png") for size in args.sizes}
        counts[split] = counts.get(split, 0) + 1
        if all(os.path.exists(o) for o in outs.values()):
            continue
        with Image.open(path) as image:
            image.load()
            for size, out in outs.items():
                os.makedirs(os.path.dirname(out), exist_ok=True)
                resize_center_crop(image, size).save(out + ".tmp.png")
                os.replace(out + ".tmp.png", out)
        if i % 500 == 0:
            print(f"{i}/{len(jobs)}", flush=True)
    print(", ".join(f"{split}: {n} images" for split, n in counts.items()),
          f"-> {', '.join(os.path.join(args.out, f'{args.name}{s}') for s in args.sizes)}")


if __name__ == "__main__":
    main()
