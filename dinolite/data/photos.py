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
