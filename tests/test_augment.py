"""Multi-crop augmentation: shapes, determinism, probabilities (blur!), input modes."""
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from dinolite.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PRESETS,
    EvalTransform,
    MultiCropAugmentation,
    denormalize,
    load_photo,
    normalize,
    random_resized_crop_box,
    to_float_tensor,
)


def random_image(size=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g)


def no_photometric(**kw):
    """An augmentation with every photometric distortion switched off."""
    base = dict(jitter_p=0.0, grayscale_p=0.0, blur=(0.0, 0.0, 0.0), solarize_p=0.0)
    return MultiCropAugmentation(**{**base, **kw})


def test_default_output_shapes_dtypes_and_ranges():
    torch.manual_seed(0)
    out = MultiCropAugmentation()(load_photo("astronaut"))
    assert set(out) == {"global_crops", "local_crops"}
    assert [tuple(c.shape) for c in out["global_crops"]] == [(3, 224, 224)] * 2
    assert [tuple(c.shape) for c in out["local_crops"]] == [(3, 96, 96)] * 8
    for crop in out["global_crops"] + out["local_crops"]:
        assert crop.dtype == torch.float32
        low = (0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
        high = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
        assert (crop.amin(dim=(1, 2)) >= low - 1e-5).all() and (crop.amax(dim=(1, 2)) <= high + 1e-5).all()
        assert crop.std() > 0.1  # real content, not a constant


def test_dinov2_defaults_match_reference():
    aug = MultiCropAugmentation()
    assert (aug.global_size, aug.local_size, aug.n_local) == (224, 96, 8)
    assert aug.global_scale == (0.32, 1.0) and aug.local_scale == (0.05, 0.32)
    assert aug.flip_p == 0.5 and aug.jitter == (0.4, 0.4, 0.2, 0.1) and aug.jitter_p == 0.8
    assert aug.grayscale_p == 0.2 and aug.solarize_p == 0.2
    assert aug.blur_p == (1.0, 0.1, 0.5)
    assert MultiCropAugmentation(blur="released").blur_p == (0.0, 0.9, 0.5)
    assert MultiCropAugmentation.from_preset("dinov2-p14").local_size == 98


def test_presets():
    v3 = MultiCropAugmentation.from_preset("dinov3-7b")
    assert (v3.global_size, v3.local_size, v3.flip_p) == (256, 112, 0.0)
    for name in ("small", "tiny"):
        aug = MultiCropAugmentation.from_preset(name)
        for patch in (8, 16):
            assert aug.global_size % patch == 0 and aug.local_size % patch == 0, (name, patch)
    assert MultiCropAugmentation.from_preset("small", n_local=2).n_local == 2
    with pytest.raises(ValueError, match="choose one of"):
        MultiCropAugmentation.from_preset("dinov4")
    assert set(PRESETS) >= {"dinov2", "dinov2-p14", "dinov3-7b", "small", "tiny"}


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="paper"):
        MultiCropAugmentation(blur="official")
    with pytest.raises(ValueError, match="probability"):
        MultiCropAugmentation(flip_p=1.5)
    with pytest.raises(ValueError, match="local_scale"):
        MultiCropAugmentation(local_scale=(0.5, 0.1))
    with pytest.raises(ValueError, match="odd"):
        MultiCropAugmentation(blur_kernel_size=4)


def test_same_seed_same_crops_different_seed_different_crops():
    aug = MultiCropAugmentation.from_preset("small")
    image = random_image(64)
    torch.manual_seed(3)
    a = aug(image)
    torch.manual_seed(3)
    b = aug(image)
    torch.manual_seed(4)
    c = aug(image)
    stack = lambda o: torch.cat([x.flatten() for x in o["global_crops"] + o["local_crops"]])
    assert torch.equal(stack(a), stack(b))
    assert not torch.allclose(stack(a), stack(c))
    # An explicit generator gives the same as seeding the global RNG, and leaves the global RNG alone.
    torch.manual_seed(99)
    state = torch.get_rng_state()
    d = aug(image, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(stack(a), stack(d))


def test_crop_box_matches_torchvision_random_resized_crop():
    image = torch.zeros(3, 120, 300)
    for seed in range(30):
        for scale in [(0.05, 0.32), (0.32, 1.0), (1.0, 1.0)]:
            torch.manual_seed(seed)
            ours = random_resized_crop_box(120, 300, scale)
            torch.manual_seed(seed)
            ref = torchvision.transforms.RandomResizedCrop.get_params(image, scale=list(scale), ratio=[3 / 4, 4 / 3])
            assert ours == tuple(ref), (seed, scale)


def test_crop_areas_follow_scale_ranges():
    torch.manual_seed(0)
    aug = no_photometric(global_size=8, local_size=8, n_local=4)
    globals_, locals_ = [], []
    image = random_image(200)
    for _ in range(50):
        params = aug(image, return_params=True)["params"]
        globals_ += [p["box"][2] * p["box"][3] / 200**2 for p in params["global"]]
        locals_ += [p["box"][2] * p["box"][3] / 200**2 for p in params["local"]]
    globals_, locals_ = np.array(globals_), np.array(locals_)
    assert globals_.min() >= 0.31 and globals_.max() <= 1.0
    assert locals_.min() >= 0.045 and locals_.max() <= 0.33
    # U(0.05, 0.32) has mean 0.185; boxes that do not fit are redrawn, which barely matters here.
    assert abs(locals_.mean() - 0.185) < 0.02


def _blurred_fraction(blur, n_draws=200):
    """Fraction of crops whose high-frequency energy collapsed, per crop position."""
    torch.manual_seed(0)
    aug = no_photometric(global_size=16, local_size=16, n_local=4, global_scale=(1.0, 1.0), local_scale=(1.0, 1.0),
                         flip_p=0.0, blur=blur, blur_sigma=(1.5, 2.0))
    image = (0.5 + 0.2 * torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    sharp = (image[..., 1:] - image[..., :-1]).abs().mean()
    counts = np.zeros(6)
    for _ in range(n_draws):
        out = aug(image, return_params=True)
        crops = out["global_crops"] + out["local_crops"]
        records = out["params"]["global"] + out["params"]["local"]
        for k, (crop, record) in enumerate(zip(crops, records)):
            x = denormalize(crop)
            blurred = (x[..., 1:] - x[..., :-1]).abs().mean() < 0.5 * sharp
            assert blurred == (record["blur_sigma"] is not None)
            counts[k] += blurred
    rates = counts / n_draws
    return rates[0], rates[1], rates[2:].mean()


def test_blur_paper_probabilities_are_measured():
    g1, g2, local = _blurred_fraction("paper")
    assert g1 == 1.0
    assert abs(g2 - 0.1) < 0.05
    assert abs(local - 0.5) < 0.05


def test_blur_released_probabilities_are_the_inverted_ones():
    g1, g2, local = _blurred_fraction("released")
    assert g1 == 0.0
    assert abs(g2 - 0.9) < 0.05
    assert abs(local - 0.5) < 0.05


def test_solarize_only_on_second_global_crop():
    image = random_image(32)
    aug = no_photometric(global_size=32, local_size=32, n_local=3, global_scale=(1.0, 1.0),
                         local_scale=(1.0, 1.0), flip_p=0.0, solarize_p=1.0)
    out = aug(image)
    first, second = denormalize(out["global_crops"][0]), denormalize(out["global_crops"][1])
    assert torch.allclose(first, image.float() / 255, atol=1e-5)  # same-size full crop is the identity
    expected = torch.where(first >= 0.5, 1 - first, first)
    assert torch.allclose(second, expected, atol=1e-5)
    for local in out["local_crops"]:
        assert torch.allclose(denormalize(local), first, atol=1e-5)
    # With p = 0.2: about 20% of second crops, never the first crop or a local crop.
    torch.manual_seed(0)
    aug = MultiCropAugmentation(global_size=8, local_size=8, n_local=2)
    flags = np.array([[p["solarize"] for p in (r["global"] + r["local"])]
                      for r in (aug(image, return_params=True)["params"] for _ in range(200))])
    assert flags[:, [0, 2, 3]].sum() == 0
    assert abs(flags[:, 1].mean() - 0.2) < 0.05


def test_jitter_and_grayscale_rates():
    torch.manual_seed(0)
    aug = MultiCropAugmentation(global_size=8, local_size=8, n_local=4, blur=(0, 0, 0))
    records = []
    image = random_image(32)
    for _ in range(100):
        p = aug(image, return_params=True)["params"]
        records += p["global"] + p["local"]
    assert abs(np.mean([r["jitter"] is not None for r in records]) - 0.8) < 0.04
    assert abs(np.mean([r["grayscale"] for r in records]) - 0.2) < 0.04
    factors = np.array([r["jitter"]["factors"] for r in records if r["jitter"] is not None])
    assert factors[:, 0].min() >= 0.6 and factors[:, 0].max() <= 1.4  # brightness 0.4
    assert factors[:, 2].min() >= 0.8 and factors[:, 2].max() <= 1.2  # saturation 0.2
    assert np.abs(factors[:, 3]).max() <= 0.1  # hue 0.1
    assert len(set(tuple(r["jitter"]["order"]) for r in records if r["jitter"])) > 10  # random order


def test_flip_is_a_mirror_of_the_same_crop():
    image = random_image(40)
    a = no_photometric(global_size=24, local_size=16, flip_p=0.0)(image, generator=torch.Generator().manual_seed(5))
    b = no_photometric(global_size=24, local_size=16, flip_p=1.0)(image, generator=torch.Generator().manual_seed(5))
    for x, y in zip(a["global_crops"] + a["local_crops"], b["global_crops"] + b["local_crops"]):
        assert torch.equal(x.flip(-1), y)


def test_small_images_are_upscaled():
    torch.manual_seed(0)
    aug = MultiCropAugmentation(global_size=64, local_size=32, n_local=2)
    for size in [(7, 10), (1, 1), (3, 200)]:
        out = aug(Image.new("RGB", size, (200, 30, 30)))
        assert tuple(out["global_crops"][0].shape) == (3, 64, 64)
        assert tuple(out["local_crops"][1].shape) == (3, 32, 32)
        assert torch.isfinite(torch.stack(out["global_crops"])).all()


def test_input_modes_become_rgb():
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    # greyscale: three equal channels, and they stay equal through the whole pipeline
    gray = rgb.convert("L")
    x = to_float_tensor(gray)
    assert x.shape == (3, 20, 30) and torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    torch.manual_seed(0)
    out = MultiCropAugmentation(global_size=32, local_size=16, n_local=2)(gray)
    for crop in out["global_crops"] + out["local_crops"]:
        d = denormalize(crop)
        assert torch.allclose(d[0], d[1], atol=1e-4) and torch.allclose(d[1], d[2], atol=1e-4)
    # RGBA: transparent pixels become white, opaque pixels keep their colour
    rgba = rgb.convert("RGBA")
    alpha = np.zeros((20, 30), dtype=np.uint8)
    alpha[:, 15:] = 255
    rgba.putalpha(Image.fromarray(alpha))
    x = to_float_tensor(rgba)
    assert torch.equal(x[:, :, :15], torch.ones(3, 20, 15))
    assert torch.allclose(x[:, :, 15:], to_float_tensor(rgb)[:, :, 15:])
    # palette and CMYK: same as PIL's RGB conversion
    palette = rgb.convert("P")
    assert torch.equal(to_float_tensor(palette), to_float_tensor(palette.convert("RGB")))
    cmyk = rgb.convert("CMYK")
    assert torch.equal(to_float_tensor(cmyk), to_float_tensor(cmyk.convert("RGB")))
    # 16-bit greyscale is rescaled by its maximum, not clipped at 255
    sixteen = Image.fromarray(np.array([[0, 1000], [2000, 4000]], dtype=np.uint16))
    assert torch.allclose(to_float_tensor(sixteen)[0], torch.tensor([[0, 64], [128, 255]]) / 255, atol=1 / 255)


def test_tensor_inputs():
    image = random_image(32)
    g = lambda: torch.Generator().manual_seed(0)
    aug = MultiCropAugmentation.from_preset("tiny")
    from_uint8 = aug(image, generator=g())
    from_float = aug(image.float() / 255, generator=g())
    from_pil = aug(Image.fromarray(image.permute(1, 2, 0).numpy()), generator=g())
    for a, b, c in zip(from_uint8["local_crops"], from_float["local_crops"], from_pil["local_crops"]):
        assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a, c, atol=1e-5)
    assert tuple(aug(image[:1], generator=g())["global_crops"][0].shape) == (3, 32, 32)  # 1 channel
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        aug(image.float())  # 0..255 floats
    with pytest.raises(ValueError, match="shape"):
        aug(torch.zeros(5, 8, 8))
    with pytest.raises(TypeError):
        aug("astronaut.jpg")


def test_gram_crops_share_the_global_boxes_without_distortion():
    image = random_image(64)
    aug = MultiCropAugmentation(global_size=16, local_size=8, n_local=1, gram_size=32, flip_p=0.0)
    out = aug(image, generator=torch.Generator().manual_seed(0), return_params=True)
    assert [tuple(c.shape) for c in out["gram_crops"]] == [(3, 32, 32)] * 2
    for gram, record in zip(out["gram_crops"], out["params"]["global"]):
        top, left, h, w = record["box"]
        expected = torchvision.transforms.v2.functional.resized_crop(
            image.float() / 255, top, left, h, w, [32, 32],
            interpolation=torchvision.transforms.InterpolationMode.BICUBIC, antialias=True).clamp(0, 1)
        assert torch.allclose(denormalize(gram), expected, atol=1e-5)


def test_eval_transform_and_denormalize():
    ramp = torch.arange(300 * 400, dtype=torch.float32).reshape(1, 300, 400).expand(3, -1, -1) / (300 * 400)
    x = EvalTransform(resize_size=None, crop_size=100)(ramp)
    assert x.shape == (3, 100, 100)
    assert torch.allclose(denormalize(x), ramp[:, 100:200, 150:250], atol=1e-5)
    y = EvalTransform(256, 224)(load_photo("coffee"))  # 400 x 600 -> 256 x 384 -> 224 x 224
    assert y.shape == (3, 224, 224)
    assert torch.allclose(denormalize(normalize(ramp)), ramp, atol=1e-6)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    assert torch.allclose(normalize(mean.expand(3, 2, 2)), torch.zeros(3, 2, 2), atol=1e-6)


def test_photometric_ops_match_torchvision():
    from torchvision.transforms.v2 import functional as TF

    from dinolite.data import augment as A

    x = torch.rand(3, 17, 23, generator=torch.Generator().manual_seed(0))
    x[:, :3, :3] = 0.5  # grey pixels: hue undefined, must stay grey
    x[:, 3, :3] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1)  # pure red: hue exactly at the wrap-around
    for shift in (-0.5, -0.1, 0.0, 0.07, 0.5):
        assert torch.allclose(A.adjust_hue(x, shift), TF.adjust_hue(x, shift), atol=1e-5), shift
    for sigma, k in ((1.3, 9), (0.4, 3), (2.0, 5)):
        assert torch.allclose(A.gaussian_blur(x, sigma, k), TF.gaussian_blur(x, [k, k], [sigma, sigma]), atol=1e-5)
    assert torch.allclose(A.adjust_brightness(x, 1.3), TF.adjust_brightness(x, 1.3), atol=1e-6)
    # torchvision's tensor greyscale uses 0.2989 for red, PIL (and we) 0.299: differences <= 1e-4
    assert torch.allclose(A.adjust_contrast(x, 1.3), TF.adjust_contrast(x, 1.3), atol=2e-4)
    assert torch.allclose(A.adjust_saturation(x, 0.7), TF.adjust_saturation(x, 0.7), atol=2e-4)
    assert torch.allclose(A.grayscale(x), TF.rgb_to_grayscale(x, num_output_channels=3), atol=2e-4)
    assert torch.equal(A.solarize(x, 0.5), TF.solarize(x, 0.5))


def test_uint8_images_are_cropped_before_conversion_with_the_same_numbers():
    """Only each crop's box is converted to float (issue 28: the whole image was converted first); converting
    the whole image, then cropping and resizing (the obvious version), gives the same bits."""
    import torchvision.transforms.v2.functional as TF

    from dinolite.data.augment import _resized_crop, _unconverted

    array = np.random.default_rng(0).integers(0, 256, (75, 100, 3), dtype=np.uint8)
    source = _unconverted(Image.fromarray(array))
    assert source.dtype == torch.uint8 and source.shape == (3, 75, 100)
    whole = torch.from_numpy(array).permute(2, 0, 1).float() / 255
    for box, size in [((0, 0, 75, 100), 32), ((10, 20, 30, 41), 24), ((74, 99, 1, 1), 8)]:
        expected = TF.resized_crop(whole, *box, size=[size, size], interpolation=TF.InterpolationMode.BICUBIC,
                                   antialias=True).clamp(0, 1)
        got = _resized_crop(source, box, size)
        assert got.dtype == torch.float32 and got.is_contiguous()
        assert torch.equal(got, expected)
        assert torch.equal(_resized_crop(whole, box, size), expected)
