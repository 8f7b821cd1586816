"""Datasets: any image folder, a list file of image paths, torchvision datasets already on disk,
and two built-in labelled datasets that need no download: SyntheticShapes (with segmentation
masks) and SyntheticTextures.

Every dataset returns (image, label) with image a PIL RGB image (or ``transform(image)``)
and label an int (-1 when unknown). ``build_dataset(spec)`` parses the CLI ``--data`` string;
``make_loader`` builds a seeded DataLoader.
"""
import os
import random
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dinolite import distributed
from dinolite.data.augment import to_rgb

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class DataError(ValueError):
    """The data cannot be used as asked: a missing or empty folder, a bad --data spec, too few images.

    The message names the problem and the fix in one line; `python -m dinolite.train` prints it as
    `error: ...` and exits with code 2 instead of showing a traceback.
    """


class DataNotFoundError(DataError, FileNotFoundError):
    """A DataError for data that is not on disk (also a FileNotFoundError)."""


def _describe_paths(paths, limit=10) -> str:
    shown = ", ".join(str(p) for p in paths[:limit])
    return shown + (f", ... ({len(paths) - limit} more)" if len(paths) > limit else "")


# --------------------------------------------------------------------------------------
# Folder of images
# --------------------------------------------------------------------------------------


class ImageFolderDataset(torch.utils.data.Dataset):
    """Every image under `root` (recursive; extensions IMAGE_EXTENSIONS, any case).

    Labels: if images live in first-level subfolders, each subfolder is a class (sorted
    names -> 0, 1, ...); images directly under root get label -1 (unlabelled).
    Files PIL cannot open are skipped when indexing (one warning names them, see
    ``.skipped``); a file that still fails when decoded (e.g. truncated) is warned about
    once and replaced by the next readable image, so training never crashes on it.
    verify=True also runs PIL's cheap ``verify()`` on every file while indexing.
    """

    def __init__(self, root, transform=None, verify: bool = True):
        self.root = Path(root).expanduser()
        if not self.root.exists():
            raise DataNotFoundError(f"image folder {self.root} does not exist; give the path of a directory of "
                                    f"images ({', '.join(IMAGE_EXTENSIONS)}), optionally in one subfolder per class")
        if not self.root.is_dir():
            raise DataError(f"{self.root} is a file; give the path of a directory of images")
        self.transform = transform
        candidates = sorted(p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not candidates:
            raise DataError(f"no images found under {self.root}; put files ending in "
                            f"{', '.join(IMAGE_EXTENSIONS)} there (searched recursively) or give another folder")
        self.skipped = []
        readable = []
        for path in candidates:
            try:
                with Image.open(path) as image:
                    if verify:
                        image.verify()
                readable.append(path)
            except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
                self.skipped.append(path)
        if self.skipped:
            warnings.warn(f"ImageFolderDataset: skipped {len(self.skipped)} unreadable file(s) under {self.root}: "
                          f"{_describe_paths(self.skipped)}", stacklevel=2)
        if not readable:
            raise DataError(f"none of the {len(candidates)} image files under {self.root} could be read "
                            f"(e.g. {candidates[0]}); check that they are complete images")
        class_of = [p.relative_to(self.root).parts[0] if len(p.relative_to(self.root).parts) > 1 else None
                    for p in readable]
        self.classes = sorted({c for c in class_of if c is not None})
        index = {c: i for i, c in enumerate(self.classes)}
        self.samples = [(p, index[c] if c is not None else -1) for p, c in zip(readable, class_of)]
        self._failed = set()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self):
        return len(self.samples)

    def _load(self, path):
        with Image.open(path) as image:
            image.load()
            return to_rgb(image)

    def __getitem__(self, i):
        for offset in range(len(self.samples)):
            path, label = self.samples[(i + offset) % len(self.samples)]
            if path in self._failed:
                continue
            try:
                image = self._load(path)
            except Exception as error:
                self._failed.add(path)
                warnings.warn(f"ImageFolderDataset: cannot decode {path} ({error}); using the next image instead")
                continue
            return (self.transform(image) if self.transform is not None else image), label
        raise RuntimeError(f"no image under {self.root} could be decoded")


class ImageListDataset(ImageFolderDataset):
    """The images named in a text file, one per line: ``PATH`` or ``PATH<TAB>LABEL``.

    Relative paths are relative to the list file's folder; blank lines and lines starting with
    ``#`` are skipped. LABEL is an integer class id (-1 or none: unlabelled); ``classes`` are the
    ids as strings, 0 .. max label. ``python -m dinolite.curate`` writes such files. Every listed
    file must exist (checked when the list is read); decoding errors are handled as in
    ImageFolderDataset (one warning, then the next readable image).
    """

    def __init__(self, list_file, transform=None):
        self.root = Path(list_file).expanduser()
        if not self.root.is_file():
            raise FileNotFoundError(f"image list {self.root} does not exist; expected a text file with one image "
                                    "path per line, optionally followed by a tab and an integer label")
        self.transform = transform
        self.samples, self.skipped, self._failed = [], [], set()
        for number, line in enumerate(self.root.read_text().splitlines(), start=1):
            if not line.strip() or line.startswith("#"):
                continue
            path, _, label = line.rstrip("\r\n").partition("\t")
            path = Path(path).expanduser()
            path = path if path.is_absolute() else self.root.parent / path
            if not path.is_file():
                raise FileNotFoundError(f"{self.root} line {number}: image {path} does not exist "
                                        "(relative paths are relative to the list file's folder)")
            try:
                label = int(label) if label.strip() else -1
            except ValueError:
                raise ValueError(f"{self.root} line {number}: label {label!r} is not an integer; write "
                                 "PATH<TAB>LABEL with an integer class id, or PATH alone") from None
            self.samples.append((path, label))
        if not self.samples:
            raise ValueError(f"image list {self.root} names no images (blank lines and # comments are skipped)")
        self.classes = [str(c) for c in range(max(label for _, label in self.samples) + 1)]


# --------------------------------------------------------------------------------------
# torchvision datasets (already downloaded)
# --------------------------------------------------------------------------------------

_DOWNLOAD_HINTS = {
    "cifar10": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                "torchvision.datasets.CIFAR10('{root}', download=True)"),
    "stl10": ("http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz",
              "torchvision.datasets.STL10('{root}', split='train+unlabeled', download=True)"),
    "imagenette": ("https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-160.tgz (or imagenette2-320.tgz, imagenette2.tgz)",
                   "torchvision.datasets.Imagenette('{root}', size='160px', download=True)"),
}


def _missing(name, root, error):
    url, call = _DOWNLOAD_HINTS[name]
    return DataNotFoundError(
        f"{name} not found under {root} ({error}). dinolite never downloads data itself; get it with "
        f"`python -c \"import torchvision; {call.format(root=root)}\"` "
        f"or download and extract {url} into {root}."
    )


class TorchvisionDataset(torch.utils.data.Dataset):
    """Wrap a torchvision dataset so items are (PIL RGB or transform(image), int label)."""

    def __init__(self, base, classes, transform=None):
        self.base, self.classes, self.transform = base, list(classes), transform

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        image, label = self.base[i]
        image = to_rgb(image)
        return (self.transform(image) if self.transform is not None else image), int(label)


def cifar10(root, train: bool = True, transform=None) -> TorchvisionDataset:
    """CIFAR-10 (32 px, 10 classes) from root (the folder holding cifar-10-batches-py)."""
    import torchvision

    try:
        base = torchvision.datasets.CIFAR10(str(root), train=train, download=False)
    except RuntimeError as error:
        raise _missing("cifar10", root, error) from None
    return TorchvisionDataset(base, base.classes, transform)


def stl10(root, split: str = "train+unlabeled", transform=None) -> TorchvisionDataset:
    """STL-10 (96 px) from root (the folder holding stl10_binary); unlabeled images get label -1."""
    import torchvision

    try:
        base = torchvision.datasets.STL10(str(root), split=split, download=False)
    except RuntimeError as error:
        raise _missing("stl10", root, error) from None
    return TorchvisionDataset(base, base.classes, transform)


def imagenette(root, split: str = "train", size: str | None = None, transform=None) -> TorchvisionDataset:
    """Imagenette (10 ImageNet classes) from root; size "full", "320px" or "160px" (None: the first found)."""
    import torchvision

    sizes = [size] if size is not None else ["160px", "320px", "full"]
    errors = []
    for s in sizes:
        try:
            base = torchvision.datasets.Imagenette(str(root), split=split, size=s, download=False)
        except RuntimeError as error:
            errors.append(f"{s}: {error}")
            continue
        classes = [names[0] for names in base.classes]
        return TorchvisionDataset(base, classes, transform)
    raise _missing("imagenette", root, "; ".join(errors))


# --------------------------------------------------------------------------------------
# SyntheticShapes
# --------------------------------------------------------------------------------------

SHAPE_CLASSES = ("circle", "square", "triangle", "star", "cross", "ring",
                 "ellipse", "hexagon", "heart", "arrow", "crescent", "L-shape")


def _regular_polygon(x, y, n):
    """Inside a regular n-gon with circumradius 1 (a vertex on +x)."""
    normals = (np.arange(n) + 0.5) * (2 * np.pi / n)
    inside = np.ones(x.shape, dtype=bool)
    for angle in normals:
        inside &= x * np.cos(angle) + y * np.sin(angle) <= np.cos(np.pi / n)
    return inside


def _star(x, y, points=5, inner=0.42):
    """Inside a star with outer radius 1 and straight edges."""
    sector = 2 * np.pi / points
    phi = np.arctan2(y, x)
    alpha = np.abs(np.mod(phi + sector / 2, sector) - sector / 2)  # angle to the nearest tip, in [0, sector/2]
    tip = np.array([1.0, 0.0])
    valley = inner * np.array([np.cos(sector / 2), np.sin(sector / 2)])
    normal = np.array([valley[1] - tip[1], tip[0] - valley[0]])  # edge tip -> valley rotated by 90 degrees
    edge_radius = (normal @ tip) / (normal[0] * np.cos(alpha) + normal[1] * np.sin(alpha))
    return np.hypot(x, y) <= edge_radius


def _shape_mask(label, x, y):
    """Silhouette of class `label` on the shape's own coordinates (about [-1, 1]^2)."""
    r2 = x * x + y * y
    name = SHAPE_CLASSES[label]
    if name == "circle":
        return r2 <= 0.85**2
    if name == "square":
        return np.maximum(np.abs(x), np.abs(y)) <= 0.7
    if name == "triangle":
        return _regular_polygon(x, y + 0.1, 3)
    if name == "star":
        return _star(x, y)
    if name == "cross":
        return ((np.abs(x) <= 0.27) & (np.abs(y) <= 0.9)) | ((np.abs(y) <= 0.27) & (np.abs(x) <= 0.9))
    if name == "ring":
        return (r2 <= 0.9**2) & (r2 >= 0.55**2)
    if name == "ellipse":
        return (x / 0.95) ** 2 + (y / 0.5) ** 2 <= 1
    if name == "hexagon":
        return _regular_polygon(x, y, 6) & (r2 <= 0.9**2 * 2)
    if name == "heart":
        u, v = x * 1.15, -y * 1.15 + 0.15
        return (u * u + v * v - 1) ** 3 - u * u * v**3 <= 0
    if name == "arrow":
        shaft = (np.abs(y) <= 0.17) & (x >= -0.9) & (x <= 0.15)
        head = (x >= 0.1) & (x <= 0.9) & (np.abs(y) <= 0.65 * (0.9 - x) / 0.8)
        return shaft | head
    if name == "crescent":
        return (r2 <= 0.85**2) & ((x - 0.4) ** 2 + y * y >= 0.7**2)
    if name == "L-shape":
        return ((x >= -0.6) & (x <= -0.15) & (np.abs(y) <= 0.85)) | ((x >= -0.6) & (x <= 0.6) & (y >= 0.4) & (y <= 0.85))
    raise AssertionError(name)


def _texture(rng, xx, yy, size):
    """A random texture field in [0, 1] over the pixel grid: stripes, checker or smooth noise."""
    kind = rng.integers(3)
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(0.08, 0.25) * size
    c, s = np.float32(np.cos(angle) / period), np.float32(np.sin(angle) / period)
    u = xx * c + yy * s
    if kind == 0:
        return (np.sin(2 * np.pi * u) > 0).astype(np.float32)
    if kind == 1:
        v = yy * c - xx * s
        return ((np.floor(u) + np.floor(v)) % 2).astype(np.float32)
    field = np.zeros(xx.shape, dtype=np.float32)
    for _ in range(3):
        f = (rng.uniform(1, 4, size=2) * 2 * np.pi / size).astype(np.float32)
        field += np.sin(f[0] * xx + f[1] * yy + np.float32(rng.uniform(0, 2 * np.pi)))
    return (field / 6 + 0.5).astype(np.float32)


class SyntheticShapes(torch.utils.data.Dataset):
    """Built-in labelled images with segmentation masks, generated on the fly (no download).

    Item i depends only on (seed, i): one shape of class i % 12 (SHAPE_CLASSES; classes are
    exactly balanced) with a random colour and texture (solid, stripes, checker, smooth
    noise), scale, position and rotation, on a background (linear gradient, texture, or
    noise). The class is recognisable from the silhouette alone.

    style="plain" is an easier variant for short CPU runs: one solid shape colour on a smooth
    two-colour gradient, no texture and no noise (same classes, geometry ranges and
    determinism). style="full" (the default) is the variant described above.

    Returns (image, label), or (image, label, mask) with return_mask=True: mask is a
    LongTensor [H, W] with 0 for background and label + 1 on the shape. The mask is for the
    untransformed image; use a geometry-preserving transform (e.g. EvalTransform(None, None))
    when you need them aligned.
    """

    classes = SHAPE_CLASSES
    num_classes = len(SHAPE_CLASSES)
    styles = ("full", "plain")

    def __init__(self, num_images: int = 10000, image_size: int = 64, seed: int = 0, transform=None,
                 return_mask: bool = False, style: str = "full"):
        if num_images < 1 or image_size < 8:
            raise DataError(f"SyntheticShapes needs num_images >= 1 and image_size >= 8, got {num_images}, {image_size}")
        if style not in self.styles:
            raise DataError(f"SyntheticShapes style must be one of {', '.join(self.styles)}, got {style!r}")
        self.style = style
        self.num_images, self.image_size, self.seed = int(num_images), int(image_size), int(seed)
        self.transform, self.return_mask = transform, return_mask
        coords = np.arange(self.image_size, dtype=np.float32) + 0.5
        self._yy, self._xx = np.meshgrid(coords, coords, indexing="ij")  # pixel centres, [S, S]

    def __len__(self):
        return self.num_images

    def replace(self, **changes) -> "SyntheticShapes":
        """The same generator with some arguments changed (e.g. a held-out split: another seed)."""
        kwargs = dict(num_images=self.num_images, image_size=self.image_size, seed=self.seed,
                      transform=self.transform, return_mask=self.return_mask, style=self.style)
        kwargs.update(changes)
        return SyntheticShapes(**kwargs)

    def generate(self, i: int):
        """Item i as numpy: (image uint8 [S,S,3], label int, mask int64 [S,S])."""
        if not 0 <= i < self.num_images:
            raise IndexError(f"index {i} out of range for SyntheticShapes of length {self.num_images}")
        rng = np.random.default_rng([self.seed, i])
        size, xx, yy = self.image_size, self._xx, self._yy
        label = i % self.num_classes
        if self.style == "plain":
            return self._generate_plain(rng, label)

        # Background: a gradient between two colours, or a two-colour texture, plus mild noise.
        bg_a, bg_b = rng.uniform(0, 1, 3).astype(np.float32), rng.uniform(0, 1, 3).astype(np.float32)
        if rng.random() < 0.5:
            angle = rng.uniform(0, 2 * np.pi)
            t = xx * np.float32(np.cos(angle) / size) + yy * np.float32(np.sin(angle) / size)
            t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        else:
            t = _texture(rng, xx, yy, size) * np.float32(rng.uniform(0.2, 1.0))
        background = bg_a + (bg_b - bg_a) * t[..., None]
        background += rng.standard_normal(background.shape, dtype=np.float32) * np.float32(rng.uniform(0, 0.06))
        bg_mean = bg_a + (bg_b - bg_a) * t.mean()

        # Shape: colour(s) far from the background's mean colour, textured half of the time.
        fg_a = rng.uniform(0, 1, 3).astype(np.float32)
        for _ in range(20):
            if np.linalg.norm(fg_a - bg_mean) >= 0.45:
                break
            fg_a = rng.uniform(0, 1, 3).astype(np.float32)
        fg_b = fg_a + rng.uniform(-0.25, 0.25, 3).astype(np.float32)
        shade = _texture(rng, xx, yy, size) if rng.random() < 0.5 else np.zeros_like(xx)
        foreground = fg_a + (fg_b - fg_a) * shade[..., None]

        # Geometry: radius 20-45% of the image, fully inside, random rotation.
        radius = rng.uniform(0.2, 0.45) * size
        cx, cy = rng.uniform(radius, size - radius, 2)
        theta = rng.uniform(0, 2 * np.pi)
        c, s = np.float32(np.cos(theta) / radius), np.float32(np.sin(theta) / radius)
        dx, dy = xx - np.float32(cx), yy - np.float32(cy)
        u = dx * c + dy * s
        v = dy * c - dx * s
        inside = _shape_mask(label, u, v)

        image = np.where(inside[..., None], foreground, background)
        image = (np.clip(image, 0, 1) * np.float32(255) + np.float32(0.5)).astype(np.uint8)
        mask = inside.astype(np.int64) * (label + 1)
        return image, label, mask

    def _shape_inside(self, rng, label):
        """Silhouette of class `label` at a random radius (20-45% of the image), position and rotation: bool [S,S]."""
        size, xx, yy = self.image_size, self._xx, self._yy
        radius = rng.uniform(0.2, 0.45) * size
        cx, cy = rng.uniform(radius, size - radius, 2)
        theta = rng.uniform(0, 2 * np.pi)
        c, s = np.float32(np.cos(theta) / radius), np.float32(np.sin(theta) / radius)
        dx, dy = xx - np.float32(cx), yy - np.float32(cy)
        return _shape_mask(label, dx * c + dy * s, dy * c - dx * s)

    def _generate_plain(self, rng, label):
        """style="plain": a solid-colour shape on a noise-free linear gradient between two colours."""
        size, xx, yy = self.image_size, self._xx, self._yy
        bg_a, bg_b = rng.uniform(0, 1, 3).astype(np.float32), rng.uniform(0, 1, 3).astype(np.float32)
        angle = rng.uniform(0, 2 * np.pi)
        t = xx * np.float32(np.cos(angle) / size) + yy * np.float32(np.sin(angle) / size)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        background = bg_a + (bg_b - bg_a) * t[..., None]
        bg_mean = (bg_a + bg_b) / 2
        colour = rng.uniform(0, 1, 3).astype(np.float32)
        for _ in range(20):  # a colour far from the background's mean colour
            if np.linalg.norm(colour - bg_mean) >= 0.45:
                break
            colour = rng.uniform(0, 1, 3).astype(np.float32)
        inside = self._shape_inside(rng, label)
        image = np.where(inside[..., None], colour, background)
        image = (np.clip(image, 0, 1) * np.float32(255) + np.float32(0.5)).astype(np.uint8)
        return image, label, inside.astype(np.int64) * (label + 1)

    def __getitem__(self, i):
        image, label, mask = self.generate(i)
        image = Image.fromarray(image)
        if self.transform is not None:
            image = self.transform(image)
        if self.return_mask:
            return image, label, torch.from_numpy(mask)
        return image, label


# --------------------------------------------------------------------------------------
# SyntheticTextures
# --------------------------------------------------------------------------------------

TEXTURE_CLASSES = ("horizontal stripes", "vertical stripes", "diagonal stripes", "checkerboard",
                   "diamond checkerboard", "dots", "grid", "rings", "waves", "zigzag", "blobs", "gradient")


def _texture_field(name, rng, x, y):
    """Binary (or smooth, for "gradient") pattern in [0, 1] of class `name`.

    x, y: pixel-centre coordinates in units of the image size ([0, 1]). The period (12-30% of
    the image), the phase and a tilt of up to 15 degrees are random. Every class looks the same
    under a horizontal flip (a flipped diagonal is still a diagonal), so flips never change it.
    """
    period = rng.uniform(0.12, 0.3)
    phase_u, phase_v = rng.uniform(0, 1, 2)
    tilt = rng.uniform(-np.pi / 12, np.pi / 12)  # +-15 degrees: a class's orientation varies a little
    x, y = (x - 0.5) * np.cos(tilt) - (y - 0.5) * np.sin(tilt), (x - 0.5) * np.sin(tilt) + (y - 0.5) * np.cos(tilt)

    def bars(t, phase):  # 1 on half of each period along t
        return np.sin(2 * np.pi * (t / period + phase)) > 0

    if name == "horizontal stripes":
        field = bars(y, phase_u)
    elif name == "vertical stripes":
        field = bars(x, phase_u)
    elif name == "diagonal stripes":
        field = bars((x + (y if rng.random() < 0.5 else -y)) / np.sqrt(2), phase_u)
    elif name == "checkerboard":
        field = bars(x, phase_u) != bars(y, phase_v)
    elif name == "diamond checkerboard":
        field = bars((x + y) / np.sqrt(2), phase_u) != bars((x - y) / np.sqrt(2), phase_v)
    elif name == "dots":
        fx, fy = (x / period + phase_u) % 1 - 0.5, (y / period + phase_v) % 1 - 0.5
        field = fx * fx + fy * fy < 0.3**2
    elif name == "grid":
        field = ((x / period + phase_u) % 1 < 0.25) | ((y / period + phase_v) % 1 < 0.25)
    elif name == "rings":
        cx, cy = rng.uniform(-0.3, 0.3, 2)
        field = bars(np.hypot(x - cx, y - cy), phase_u)
    elif name == "waves":
        field = bars(y + 0.06 * np.sin(np.pi * x / period + 2 * np.pi * phase_v), phase_u)
    elif name == "zigzag":
        triangle = np.abs((x / (2 * period) + phase_v) % 1 - 0.5) * 1.6 * period
        field = bars(y + triangle, phase_u)
    elif name == "blobs":  # a thresholded smooth random field
        coarse = rng.standard_normal((4, 4)).astype(np.float32)
        size = x.shape[0]
        field = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC)) > 0
    elif name == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        t = np.cos(angle) * x + np.sin(angle) * y
        return ((t - t.min()) / max(float(t.max() - t.min()), 1e-6)).astype(np.float32)
    else:
        raise AssertionError(name)
    return field.astype(np.float32)


class SyntheticTextures(torch.utils.data.Dataset):
    """Built-in labelled gray-level pattern images, generated on the fly (no download).

    Item i depends only on (seed, i): a pattern of class i % 12 (TEXTURE_CLASSES; exactly
    balanced) in two random gray levels (one dark, one light, either way round), with a random
    period, phase, tilt (and centre, direction or field where the class has one) and mild noise.

    Every crop of an image shows its class, so this is the dataset on which a few hundred
    CPU steps of self-supervised training visibly learn. The images are gray on purpose: with
    random colours, the colour pair is the easiest feature that agrees across the crops of one
    image, and a short run learns it first (colour says nothing about the class).

    Returns (image, label); image is a PIL RGB image (or transform(image)).
    """

    classes = TEXTURE_CLASSES
    num_classes = len(TEXTURE_CLASSES)

    def __init__(self, num_images: int = 10000, image_size: int = 32, seed: int = 0, transform=None):
        if num_images < 1 or image_size < 8:
            raise DataError(f"SyntheticTextures needs num_images >= 1 and image_size >= 8, "
                             f"got {num_images}, {image_size}")
        self.num_images, self.image_size, self.seed = int(num_images), int(image_size), int(seed)
        self.transform = transform
        coords = (np.arange(self.image_size, dtype=np.float32) + 0.5) / self.image_size
        self._y, self._x = np.meshgrid(coords, coords, indexing="ij")  # [S, S] in (0, 1)

    def __len__(self):
        return self.num_images

    def replace(self, **changes) -> "SyntheticTextures":
        """The same generator with some arguments changed (e.g. a held-out split: another seed)."""
        kwargs = dict(num_images=self.num_images, image_size=self.image_size, seed=self.seed,
                      transform=self.transform)
        kwargs.update(changes)
        return SyntheticTextures(**kwargs)

    def generate(self, i: int):
        """Item i as numpy: (image uint8 [S, S, 3], label int)."""
        if not 0 <= i < self.num_images:
            raise IndexError(f"index {i} out of range for SyntheticTextures of length {self.num_images}")
        rng = np.random.default_rng([self.seed, i, 7])
        label = i % self.num_classes
        field = _texture_field(TEXTURE_CLASSES[label], rng, self._x, self._y)
        dark, light = rng.uniform(0.0, 0.4), rng.uniform(0.6, 1.0)
        if rng.random() < 0.5:
            dark, light = light, dark
        gray = dark + (light - dark) * field
        gray = gray + rng.standard_normal(gray.shape).astype(np.float32) * np.float32(0.03)
        gray = (np.clip(gray, 0, 1) * 255 + 0.5).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1), label

    def __getitem__(self, i):
        image, label = self.generate(i)
        image = Image.fromarray(image)
        if self.transform is not None:
            image = self.transform(image)
        return image, label


class TextureMosaics(torch.utils.data.Dataset):
    """A dense task on the textures' own domain: SyntheticTextures image i with a rectangle (a quarter to half of
    the image, random place) taken from a texture of another class. Item i depends only on (seed, i).

    Returns (image, label, mask): label is the outer texture's class, mask LongTensor [S, S] the class id of
    each pixel (0..11), for dense probes (dinolite.eval.dense_probe with num_classes 12).
    """

    num_classes = len(TEXTURE_CLASSES)

    def __init__(self, num_images: int = 1000, image_size: int = 32, seed: int = 0, transform=None):
        self.textures = SyntheticTextures(2 * num_images + 1, image_size, seed=seed)
        self.num_images, self.image_size, self.transform = int(num_images), int(image_size), transform

    def __len__(self):
        return self.num_images

    def __getitem__(self, i):
        if not 0 <= i < self.num_images:
            raise IndexError(f"index {i} out of range for TextureMosaics of length {self.num_images}")
        outer, label = self.textures.generate(i)
        rng = np.random.default_rng([self.textures.seed, i, 11])
        j = self.num_images + i  # a texture of another class: classes cycle with the index
        if j % self.num_classes == label:
            j += 1
        inner, inner_label = self.textures.generate(j)
        S = self.image_size
        h, w = (int(rng.integers(S // 2, int(S * 0.71) + 1)) for _ in range(2))
        top, left = int(rng.integers(0, S - h + 1)), int(rng.integers(0, S - w + 1))
        image, mask = outer.copy(), np.full((S, S), label, dtype=np.int64)
        image[top:top + h, left:left + w] = inner[top:top + h, left:left + w]
        mask[top:top + h, left:left + w] = inner_label
        image = Image.fromarray(image)
        if self.transform is not None:
            image = self.transform(image)
        return image, label, torch.from_numpy(mask)


# --------------------------------------------------------------------------------------
# --data spec and DataLoader
# --------------------------------------------------------------------------------------

DATA_SPEC_FORMS = (
    "builtin  |  builtin:n=2000,size=64,seed=0,style=plain   (SyntheticShapes, no download; style full|plain)",
    "textures |  textures:n=2000,size=32,seed=0   (SyntheticTextures, 12 gray pattern classes, no download)",
    "folder:PATH  or an existing directory PATH   (images, optionally one subfolder per class)",
    "list:FILE    (one image path per line, optionally TAB + integer label; paths relative to FILE's folder)",
    "cifar10:ROOT   (torchvision CIFAR-10 already downloaded under ROOT)",
    "stl10:ROOT     (torchvision STL-10 train+unlabeled under ROOT)",
    "imagenette:ROOT (torchvision Imagenette under ROOT)",
)


def _spec_error(spec, problem):
    forms = "; ".join(" ".join(form.split()) for form in DATA_SPEC_FORMS)
    return DataError(f"bad --data spec {spec!r}: {problem}. Valid forms: {forms}")


def _parse_options(spec: str, arg: str, defaults: dict, choices: dict) -> dict:
    """"n=2000,size=32" -> defaults updated; integer options, or one of choices[key]."""
    options = dict(defaults)
    kind = spec.partition(":")[0]
    for item in filter(None, arg.split(",")):
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or key not in options:
            raise _spec_error(spec, f"unknown {kind} option {item!r} (options: {', '.join(options)})")
        if key in choices:
            if value not in choices[key]:
                raise _spec_error(spec, f"{kind} {key} must be one of {', '.join(choices[key])}, got {value!r}")
            options[key] = value
            continue
        try:
            options[key] = int(value)
        except ValueError:
            raise _spec_error(spec, f"{kind} option {key} must be an integer, got {value!r}") from None
    return options


def build_dataset(spec: str, transform=None, train: bool = True, return_mask: bool = False):
    """Dataset from a --data spec string (see DATA_SPEC_FORMS).

    train selects the training split of torchvision datasets (STL-10: train+unlabeled; False:
    test). return_mask applies to builtin only.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise _spec_error(spec, "empty")
    spec = spec.strip()
    kind, _, arg = spec.partition(":")
    if kind == "builtin":
        o = _parse_options(spec, arg, {"n": 10000, "size": 64, "seed": 0, "style": "full"},
                           {"style": SyntheticShapes.styles})
        return SyntheticShapes(num_images=o["n"], image_size=o["size"], seed=o["seed"],
                               transform=transform, return_mask=return_mask, style=o["style"])
    if kind == "textures":
        o = _parse_options(spec, arg, {"n": 10000, "size": 32, "seed": 0}, {})
        return SyntheticTextures(num_images=o["n"], image_size=o["size"], seed=o["seed"], transform=transform)
    if kind in ("folder", "list", "cifar10", "stl10", "imagenette"):
        if not arg:
            raise _spec_error(spec, f"{kind} needs a path after the colon")
        root = os.path.expanduser(arg)
        if kind == "folder":
            return ImageFolderDataset(root, transform=transform)
        if kind == "list":
            return ImageListDataset(root, transform=transform)
        if kind == "cifar10":
            return cifar10(root, train=train, transform=transform)
        if kind == "stl10":
            return stl10(root, split="train+unlabeled" if train else "test", transform=transform)
        return imagenette(root, split="train" if train else "val", transform=transform)
    if os.path.isdir(os.path.expanduser(spec)):
        return ImageFolderDataset(os.path.expanduser(spec), transform=transform)
    raise _spec_error(spec, "not a known dataset kind and not an existing directory")


def _seed_worker(worker_id):
    """Seed numpy and random in a DataLoader worker from its torch seed (base seed + worker id)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(dataset, batch_size: int, collate_fn=None, num_workers: int = 0, seed: int = 0,
                shuffle: bool = True, drop_last: bool = True, pin_memory: bool | None = None,
                persistent_workers: bool | None = None) -> torch.utils.data.DataLoader:
    """A DataLoader whose shuffling and per-worker augmentation randomness follow `seed`.

    Workers get torch seed (base seed from `seed`) + worker id, and numpy/random are seeded
    from it. Under torch.distributed a DistributedSampler splits the data across ranks
    (call ``loader.sampler.set_epoch(epoch)`` each epoch to reshuffle). pin_memory defaults
    to CUDA availability, persistent_workers to num_workers > 0.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if drop_last and len(dataset) < batch_size * distributed.get_world_size():
        raise DataError(f"dataset has {len(dataset)} items, fewer than one batch of {batch_size} per rank "
                        "with drop_last=True; use a smaller batch_size or more data")
    generator = torch.Generator().manual_seed(seed)
    sampler = None
    if distributed.is_enabled():
        sampler = torch.utils.data.DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
        shuffle = False
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, collate_fn=collate_fn,
        num_workers=num_workers, drop_last=drop_last, generator=generator, worker_init_fn=_seed_worker,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=(num_workers > 0) if persistent_workers is None else persistent_workers,
    )
