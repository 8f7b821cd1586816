"""Built-in labelled datasets that need no download, generated from a seed: SyntheticShapes (shapes on textured
backgrounds, with segmentation masks), SyntheticTextures (12 gray pattern classes) and TextureMosaics (one texture
label per pixel, for dense probes)."""
import numpy as np
import torch
from PIL import Image

from dinolite.data.datasets import DataError


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


def shape_mask(label, x, y):
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
        inside = shape_mask(label, u, v)

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
        return shape_mask(label, dx * c + dy * s, dy * c - dx * s)

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
