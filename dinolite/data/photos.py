"""Real photographs that ship with scikit-image, for figures and demos (no download)."""
import numpy as np
from PIL import Image

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
