"""Multi-crop augmentation (DINO / DINOv2 / DINOv3) and the evaluation transform.

One image becomes 2 global crops (large, most of the image) and n local crops (small
patches of it). The student sees all crops, the teacher only the global ones; matching a
local crop to a global crop forces the network to infer the whole from a part.

Every random decision is drawn from one ``torch.Generator`` (the global torch RNG when none
is given), so ``torch.manual_seed(s)`` or ``generator=torch.Generator().manual_seed(s)``
makes the crops reproducible. Crops use torchvision's antialiased bicubic resize; the
photometric operations are small elementwise functions below (the tests check them against
torchvision's), which stay fast on small crops on a busy CPU.

Blur probabilities. The official DINOv2 helper for random Gaussian blur takes a
probability ``p`` and applies the blur with probability ``1 - p``. The configuration asks
for 1.0 / 0.1 / 0.5 (global crop 1 / global crop 2 / local crops), as the paper describes,
so the released checkpoints were in fact trained with 0.0 / 0.9 / 0.5. The blur itself is
DINOv2's: kernel 9, sigma uniform in [0.1, 2.0].
``blur="paper"`` (default) gives the intended values, ``blur="released"`` the effective ones.
"""
import math

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Probability of Gaussian blur on (global crop 1, global crop 2, each local crop).
BLUR_PROBABILITIES = {
    "paper": (1.0, 0.1, 0.5),  # what the DINOv2 paper and config intend
    "released": (0.0, 0.9, 0.5),  # what the official helper actually applies (inverted p)
}

# Named settings for MultiCropAugmentation.from_preset. Small presets keep every crop a
# multiple of 8 and 16 so ViTs with patch 8 or 16 tile them exactly.
PRESETS = {
    # DINOv2 defaults (local 96 as in the default config, e.g. for patch 16 / 8).
    "dinov2": dict(global_size=224, local_size=96, n_local=8),
    # DINOv2 with patch 14: 98 = 7 x 14 so local crops tile exactly.
    "dinov2-p14": dict(global_size=224, local_size=98, n_local=8),
    # DINOv3 7B: larger crops, no horizontal flips.
    "dinov3-7b": dict(global_size=256, local_size=112, n_local=8, flip_p=0.0),
    # Small images on CPU (datasets of 64-96 px, e.g. SyntheticShapes at 64, STL-10, Imagenette-160).
    "small": dict(global_size=64, local_size=32, n_local=6, blur_sigma=(0.1, 1.0), blur_kernel_size=5),
    # Tiny images (32 px, e.g. CIFAR-10).
    "tiny": dict(global_size=32, local_size=16, n_local=6, blur_sigma=(0.1, 0.5), blur_kernel_size=3),
}


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL image to RGB: transparency is composited on white, CMYK/palette/grey
    are converted, 16-bit and float greyscale are rescaled to 0..255 by their maximum."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(image).__name__}")
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() if array.size and array.max() > 0 else 1.0
        image = Image.fromarray(np.round(array / peak * 255).clip(0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def to_float_tensor(image) -> torch.Tensor:
    """PIL image, HxWxC numpy array or [C,H,W] tensor -> float32 tensor [3,H,W] in [0, 1].

    Tensors: uint8 (0..255) or float (must already be in [0, 1]); 1 channel is repeated,
    4 channels (RGBA) are composited on white.
    """
    if isinstance(image, Image.Image):
        array = np.asarray(to_rgb(image), dtype=np.uint8)
        return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255)
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 3 and array.shape[-1] in (1, 3, 4):
            array = array.transpose(2, 0, 1)
        image = torch.from_numpy(np.ascontiguousarray(array))
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"expected a PIL image, numpy array or tensor, got {type(image).__name__}")
    x = image
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or x.shape[0] not in (1, 3, 4):
        raise ValueError(f"expected an image tensor [3,H,W] (or [1,H,W], [4,H,W], [H,W]), got shape {list(image.shape)}")
    if x.dtype == torch.uint8:
        x = x.float() / 255
    elif x.is_floating_point():
        x = x.float()
        if x.numel() and (x.min() < -1e-3 or x.max() > 1 + 1e-3):
            raise ValueError(
                f"float image tensors must hold values in [0, 1], got range [{x.min():.3g}, {x.max():.3g}]; "
                "divide 0..255 data by 255, or call denormalize() on a normalised tensor first"
            )
        x = x.clamp(0, 1)
    else:
        raise ValueError(f"unsupported image dtype {x.dtype}; use uint8 (0..255) or float (0..1)")
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    elif x.shape[0] == 4:
        alpha = x[3:4]
        x = x[:3] * alpha + (1 - alpha)  # composite on white
    return x.contiguous()


_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """[..., 3, H, W] in [0, 1] -> ImageNet-normalised."""
    return (x - _MEAN.to(x)) / _STD.to(x)


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Undo ImageNet normalisation for display: [..., 3, H, W] -> values clamped to [0, 1]."""
    return (x * _STD.to(x) + _MEAN.to(x)).clamp(0, 1)


# ----- photometric operations on float images [3, H, W] in [0, 1] --------------------------

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as used by PIL and torchvision


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """[3,H,W] -> [3,H,W] with every channel the luma."""
    luma = _LUMA[0] * x[0] + _LUMA[1] * x[1] + _LUMA[2] * x[2]
    return luma.expand(3, -1, -1).contiguous()


def adjust_brightness(x, factor: float):
    return (x * factor).clamp(0, 1)


def adjust_contrast(x, factor: float):
    """Blend with the mean luma of the image."""
    mean = grayscale(x)[0].mean()
    return (factor * x + (1 - factor) * mean).clamp(0, 1)


def adjust_saturation(x, factor: float):
    """Blend with the greyscale image."""
    return (factor * x + (1 - factor) * grayscale(x)).clamp(0, 1)


def adjust_hue(x, shift: float):
    """Rotate the hue by `shift` turns (in [-0.5, 0.5]) in HSV space."""
    r, g, b = x[0], x[1], x[2]
    value = torch.maximum(torch.maximum(r, g), b)
    chroma = value - torch.minimum(torch.minimum(r, g), b)
    grey = chroma == 0
    saturation = chroma / torch.where(grey, torch.ones_like(value), value)
    safe = torch.where(grey, torch.ones_like(chroma), chroma)
    rc, gc, bc = (value - r) / safe, (value - g) / safe, (value - b) / safe
    hue = torch.where(value == r, bc - gc, torch.where(value == g, 2 + rc - bc, 4 + gc - rc))
    hue = torch.where(grey, torch.zeros_like(hue), hue)
    hue = torch.remainder(hue / 6 + shift, 1.0)
    # back to RGB: sector i of the colour wheel, fraction f inside it
    h6 = hue * 6
    sector = torch.floor(h6)
    f = h6 - sector
    sector = sector.long() % 6
    p = value * (1 - saturation)
    q = value * (1 - saturation * f)
    t = value * (1 - saturation * (1 - f))
    table = torch.stack([
        torch.stack([value, q, p, p, t, value]),
        torch.stack([t, value, value, q, p, p]),
        torch.stack([p, p, t, value, value, q]),
    ])  # [3 channels, 6 sectors, H, W]
    return table.gather(1, sector.expand(3, 1, *sector.shape)).squeeze(1)


def gaussian_blur(x, sigma: float, kernel_size: int):
    """Separable Gaussian blur with reflect padding: [3,H,W] -> [3,H,W]."""
    half = kernel_size // 2
    offsets = torch.arange(-half, half + 1, dtype=x.dtype)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    weights = (weights / weights.sum()).tolist()

    def reflect_index(n):
        i = torch.arange(-half, n + half).abs()
        return torch.where(i > n - 1, 2 * (n - 1) - i, i).clamp(0, n - 1)

    for dim in (2, 1):
        n = x.shape[dim]
        padded = x.index_select(dim, reflect_index(n))
        x = sum(w * padded.narrow(dim, k, n) for k, w in enumerate(weights))
    return x


def solarize(x, threshold: float = 0.5):
    """Invert the pixels at or above threshold."""
    return torch.where(x >= threshold, 1 - x, x)


def _uniform(generator, low: float, high: float) -> float:
    return torch.empty(1).uniform_(low, high, generator=generator).item()


def _coin(generator, p: float) -> bool:
    """True with probability p (always draws one number, so the stream does not depend on p)."""
    return torch.rand(1, generator=generator).item() < p


def random_resized_crop_box(height: int, width: int, scale, ratio=(3 / 4, 4 / 3), generator=None):
    """Sample a crop box (top, left, h, w) covering a fraction `scale` of the image area with
    aspect ratio (w/h) log-uniform in `ratio`; after 10 failed tries, the largest centred box
    with an aspect ratio inside `ratio`. Same rule as torchvision's RandomResizedCrop."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(generator, scale[0], scale[1])
        aspect = math.exp(_uniform(generator, *log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = torch.randint(0, height - h + 1, size=(1,), generator=generator).item()
            left = torch.randint(0, width - w + 1, size=(1,), generator=generator).item()
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, max(h, 1), max(w, 1)


def _unconverted(image) -> torch.Tensor:
    """A PIL image or a uint8 RGB array/tensor -> uint8 tensor [3, H, W] (no float copy of the whole image);
    anything else -> to_float_tensor(image)."""
    if isinstance(image, Image.Image):
        return torch.from_numpy(np.asarray(to_rgb(image), dtype=np.uint8).copy()).permute(2, 0, 1)
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3:
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 3:
        return image
    return to_float_tensor(image)


def _resized_crop(image: torch.Tensor, box, size: int) -> torch.Tensor:
    """image [3, H, W] (uint8 or float in [0, 1]), box (top, left, height, width) inside it -> the box resized to
    [3, size, size], float32 in [0, 1] (bicubic, antialiased). Only the box is converted to float: the same
    numbers as converting the whole image first (conversion is per pixel), at a fraction of the work."""
    top, left, height, width = box
    region = image[:, top:top + height, left:left + width]
    if region.dtype == torch.uint8:  # converted channels-last (the decoded image's own layout): one pass, no copy
        region = region.permute(1, 2, 0).float().div_(255).permute(2, 0, 1)
    crop = TF.resize(region, [size, size], interpolation=TF.InterpolationMode.BICUBIC, antialias=True).clamp_(0, 1)
    return crop.contiguous()


class MultiCropAugmentation:
    """Image -> dict(global_crops=[2 x Tensor[3,G,G]], local_crops=[n_local x Tensor[3,L,L]]).

    Per crop: RandomResizedCrop (bicubic, antialiased) -> horizontal flip (flip_p) ->
    colour jitter (brightness, contrast, saturation, hue in random order, with prob.
    jitter_p) -> greyscale (grayscale_p) -> Gaussian blur (see ``blur``) -> solarize
    (solarize_p, second global crop only) -> ImageNet normalisation. Outputs are float32.

    blur: "paper" (default; probabilities 1.0 / 0.1 / 0.5 for global 1 / global 2 / locals),
        "released" (0.0 / 0.9 / 0.5, what the official code effectively did), or a tuple of
        three probabilities.
    gram_size: if set (DINOv3 Gram teacher), also return "gram_crops": the two global crop
        boxes (same flip) resized to gram_size with no photometric distortion.
    """

    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 96,
        n_local: int = 8,
        global_scale=(0.32, 1.0),
        local_scale=(0.05, 0.32),
        flip_p: float = 0.5,
        jitter=(0.4, 0.4, 0.2, 0.1),
        jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        blur="paper",
        blur_sigma=(0.1, 2.0),
        blur_kernel_size: int = 9,
        solarize_p: float = 0.2,
        gram_size: int | None = None,
    ):
        if isinstance(blur, str):
            if blur not in BLUR_PROBABILITIES:
                raise ValueError(f"blur={blur!r}: use 'paper', 'released' or a tuple of 3 probabilities")
            blur_p = BLUR_PROBABILITIES[blur]
        else:
            blur_p = tuple(float(p) for p in blur)
            if len(blur_p) != 3:
                raise ValueError(f"blur must give 3 probabilities (global 1, global 2, locals), got {blur!r}")
        for name, p in [("flip_p", flip_p), ("jitter_p", jitter_p), ("grayscale_p", grayscale_p),
                        ("solarize_p", solarize_p), *[("blur", q) for q in blur_p]]:
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
        for name, s in [("global_scale", global_scale), ("local_scale", local_scale)]:
            if not 0 < s[0] <= s[1] <= 1:
                raise ValueError(f"{name} must satisfy 0 < low <= high <= 1, got {s}")
        if global_size < 1 or local_size < 1 or n_local < 0:
            raise ValueError(f"need global_size, local_size >= 1 and n_local >= 0, got {global_size}, {local_size}, {n_local}")
        if not 0 < blur_sigma[0] <= blur_sigma[1]:
            raise ValueError(f"blur_sigma must satisfy 0 < low <= high, got {tuple(blur_sigma)}")
        if blur_kernel_size % 2 != 1:
            raise ValueError(f"blur_kernel_size must be odd, got {blur_kernel_size}")
        self.global_size, self.local_size, self.n_local = int(global_size), int(local_size), int(n_local)
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
        self.flip_p, self.jitter, self.jitter_p = flip_p, tuple(jitter), jitter_p
        self.grayscale_p, self.solarize_p = grayscale_p, solarize_p
        self.blur_p = blur_p  # (global crop 1, global crop 2, local crops)
        self.blur_sigma, self.blur_kernel_size = tuple(blur_sigma), int(blur_kernel_size)
        self.gram_size = gram_size

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "MultiCropAugmentation":
        """Build from a named preset in PRESETS ("dinov2", "dinov2-p14", "dinov3-7b", "small",
        "tiny"), with keyword overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown multi-crop preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def __repr__(self):
        return (f"MultiCropAugmentation(global_size={self.global_size}, local_size={self.local_size}, "
                f"n_local={self.n_local}, blur_p={self.blur_p}, flip_p={self.flip_p})")

    def _photometric(self, crop, blur_p, solarize_p, generator, record):
        """crop [3,h,w] in [0,1] -> distorted crop; fills `record` with what was applied."""
        record["jitter"] = None
        if _coin(generator, self.jitter_p):
            b, c, s, h = self.jitter
            order = torch.randperm(4, generator=generator).tolist()
            factors = [_uniform(generator, 1 - b, 1 + b), _uniform(generator, 1 - c, 1 + c),
                       _uniform(generator, 1 - s, 1 + s), _uniform(generator, -h, h)]
            ops = [adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue]
            for i in order:
                crop = ops[i](crop, factors[i])
            record["jitter"] = dict(order=order, factors=factors)
        record["grayscale"] = _coin(generator, self.grayscale_p)
        if record["grayscale"]:
            crop = grayscale(crop)
        record["blur_sigma"] = None
        if _coin(generator, blur_p):
            sigma = _uniform(generator, *self.blur_sigma)
            crop = gaussian_blur(crop, sigma, self.blur_kernel_size)
            record["blur_sigma"] = sigma
        record["solarize"] = _coin(generator, solarize_p) if solarize_p > 0 else False
        if record["solarize"]:
            crop = solarize(crop, 0.5)
        return crop

    def _crop(self, image, size, scale, generator, record):
        _, height, width = image.shape
        box = random_resized_crop_box(height, width, scale, generator=generator)
        crop = _resized_crop(image, box, size)
        record["box"] = box  # (top, left, height, width) in input pixels
        record["flip"] = _coin(generator, self.flip_p)
        if record["flip"]:
            crop = TF.horizontal_flip(crop)
        return crop

    def __call__(self, image, generator: torch.Generator | None = None, return_params: bool = False) -> dict:
        """image: PIL image (any mode), HxWxC uint8 array or [3,H,W] uint8/float tensor.

        Returns dict(global_crops=[2 x Tensor[3,G,G]], local_crops=[n_local x Tensor[3,L,L]])
        (float32, normalised), plus "gram_crops" if gram_size is set, plus "params" (one dict
        per crop: box, flip, jitter, grayscale, blur_sigma, solarize) if return_params.
        """
        x = _unconverted(image)  # uint8 stays uint8: only the crops are converted to float (_resized_crop)
        out = {"global_crops": [], "local_crops": []}
        params = {"global": [], "local": []}
        gram = []
        for i in range(2):
            record = {}
            geometric = self._crop(x, self.global_size, self.global_scale, generator, record)
            solarize_p = self.solarize_p if i == 1 else 0.0
            crop = self._photometric(geometric.clone(), self.blur_p[i], solarize_p, generator, record)
            out["global_crops"].append(normalize(crop))
            params["global"].append(record)
            if self.gram_size is not None:
                g = _resized_crop(x, record["box"], self.gram_size)
                gram.append(normalize(TF.horizontal_flip(g) if record["flip"] else g))
        for _ in range(self.n_local):
            record = {}
            crop = self._crop(x, self.local_size, self.local_scale, generator, record)
            crop = self._photometric(crop, self.blur_p[2], 0.0, generator, record)
            out["local_crops"].append(normalize(crop))
            params["local"].append(record)
        if self.gram_size is not None:
            out["gram_crops"] = gram
        if return_params:
            out["params"] = params
        return out


class EvalTransform:
    """Feature-extraction transform: resize the shorter side to resize_size (bicubic), centre
    crop crop_size, normalise. Image -> Tensor[3, crop_size, crop_size]. Either size may be
    None to skip that step (e.g. both None: just to-tensor + normalise)."""

    def __init__(self, resize_size: int | None = 256, crop_size: int | None = 224):
        self.resize_size, self.crop_size = resize_size, crop_size

    def __call__(self, image) -> torch.Tensor:
        x = to_float_tensor(image)
        if self.resize_size is not None:
            x = TF.resize(x, [self.resize_size], interpolation=TF.InterpolationMode.BICUBIC, antialias=True).clamp_(0, 1)
        if self.crop_size is not None:
            x = TF.center_crop(x, [self.crop_size, self.crop_size])
        return normalize(x)

    def __repr__(self):
        return f"EvalTransform(resize_size={self.resize_size}, crop_size={self.crop_size})"
