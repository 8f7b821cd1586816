"""Real photographs that ship with scikit-image, for figures, demos and a dense task (no download)."""
import numpy as np
import torch
from PIL import Image

from dinolite.data.datasets import DataError
from dinolite.data.synthetic import SHAPE_CLASSES, shape_mask

# Photos bundled inside the scikit-image wheel (the others in skimage.data are fetched on demand).
PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle", "immunohistochemistry")


def load_photo(name: str) -> Image.Image:
    """Return one of PHOTO_NAMES as an RGB PIL image."""
    import skimage.data

    if name not in PHOTO_NAMES:
        raise ValueError(f"unknown photo {name!r}; choose one of {', '.join(PHOTO_NAMES)}")
    if name == "motorcycle":
        array = skimage.data.stereo_motorcycle()[0]  # the left view of the stereo pair
    else:
        array = getattr(skimage.data, name)()
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    return Image.fromarray(np.ascontiguousarray(array[..., :3]).astype(np.uint8)).convert("RGB")


def sample_photos(names=PHOTO_NAMES) -> list:
    """A list of RGB PIL images, one per name."""
    return [load_photo(n) for n in names]


def photo_tiles(tile: int = 48, size: int = 32, min_contrast: float = 12.0, names=PHOTO_NAMES) -> list:
    """Distinct small photographs without a download: PHOTO_NAMES cut into non-overlapping
    tile x tile crops, each resized to size x size (bicubic, antialiased). Tiles whose grey
    standard deviation is below min_contrast (of 255) are dropped: flat patches of sky or
    background look alike and are not distinct images in any useful sense. 48-px tiles: 472 images.
    """
    tiles = []
    for name in names:
        photo = load_photo(name)
        w, h = photo.size
        for y in range(0, h - tile + 1, tile):
            for x in range(0, w - tile + 1, tile):
                crop = photo.crop((x, y, x + tile, y + tile)).resize((size, size), Image.BICUBIC, reducing_gap=None)
                if np.asarray(crop.convert("L"), dtype=np.float32).std() >= min_contrast:
                    tiles.append(crop)
    return tiles


class PhotoMosaics(torch.utils.data.Dataset):
    """A dense task on real photographs without a download: a crop of one of the PHOTO_NAMES photos with a
    shape cut into it from a crop of another. The mask says which photo each pixel shows, so a patch is
    labelled by its content, and a probe that reads the photos' content (fur, grain, sky, metal) beats
    one that only sees colour.

    Item i depends only on (seed, split, i): two different photos (background, shape), each cropped to a
    square of 0.2-0.38 of the photo's shorter side and resized to image_size (bicubic); a silhouette of a
    random SHAPE_CLASSES class (its unit size 0.45-0.8 of the half-width, random place and rotation) takes its pixels
    from the second crop. split="train" crops from the left 60% of every photo and split="held-out" from
    the right 40%, so held-out mosaics show photo regions that no training mosaic contains.

    Returns (image, label, mask): label is the background photo's index in PHOTO_NAMES, mask LongTensor
    [S, S] the photo index of each pixel (num_classes 6), for dinolite.eval.dense_probe.
    """

    num_classes = len(PHOTO_NAMES)
    classes = PHOTO_NAMES
    splits = {"train": (0.0, 0.6), "held-out": (0.6, 1.0)}  # the share of each photo's width crops come from

    def __init__(self, num_images: int = 600, image_size: int = 64, split: str = "train", seed: int = 0,
                 transform=None):
        if split not in self.splits:
            raise DataError(f"PhotoMosaics split must be one of {', '.join(self.splits)}, got {split!r}")
        if num_images < 1 or image_size < 8:
            raise DataError(f"PhotoMosaics needs num_images >= 1 and image_size >= 8, got {num_images}, {image_size}")
        self.num_images, self.image_size, self.split, self.seed = int(num_images), int(image_size), split, int(seed)
        self.transform = transform
        self.photos = [np.asarray(load_photo(name)) for name in PHOTO_NAMES]
        coords = (np.arange(self.image_size, dtype=np.float32) + 0.5) / self.image_size * 2 - 1
        self._yy, self._xx = np.meshgrid(coords, coords, indexing="ij")  # pixel centres in [-1, 1]

    def __len__(self):
        return self.num_images

    def _crop(self, rng, k: int) -> np.ndarray:
        """A random square crop of photo k within this split's columns, resized to image_size: uint8 [S, S, 3]."""
        photo = self.photos[k]
        height, width = photo.shape[:2]
        side = int(rng.uniform(0.2, 0.38) * min(height, width))
        start, stop = self.splits[self.split]
        left = int(rng.integers(int(start * width), int(stop * width) - side + 1))
        top = int(rng.integers(0, height - side + 1))
        crop = Image.fromarray(photo[top:top + side, left:left + side])
        return np.asarray(crop.resize((self.image_size, self.image_size), Image.BICUBIC))

    def generate(self, i: int):
        """Item i as numpy: (image uint8 [S, S, 3], background photo index, mask int64 [S, S])."""
        if not 0 <= i < self.num_images:
            raise IndexError(f"index {i} out of range for PhotoMosaics of length {self.num_images}")
        rng = np.random.default_rng([self.seed, list(self.splits).index(self.split), i])
        outer, inner = (int(k) for k in rng.choice(len(self.photos), 2, replace=False))
        background, cut_from = self._crop(rng, outer), self._crop(rng, inner)
        scale, angle = rng.uniform(0.45, 0.8), rng.uniform(0, 2 * np.pi)
        cx, cy = rng.uniform(-0.35, 0.35, size=2)
        u, v = (self._xx - cx) / scale, (self._yy - cy) / scale
        u, v = u * np.cos(angle) + v * np.sin(angle), v * np.cos(angle) - u * np.sin(angle)
        inside = shape_mask(int(rng.integers(len(SHAPE_CLASSES))), u, v)
        image = np.where(inside[..., None], cut_from, background).astype(np.uint8)
        return image, outer, np.where(inside, inner, outer).astype(np.int64)

    def __getitem__(self, i):
        image, label, mask = self.generate(i)
        image = Image.fromarray(image)
        if self.transform is not None:
            image = self.transform(image)
        return image, label, torch.from_numpy(mask)
