"""Datasets: image folders with broken files, torchvision wrappers, SyntheticShapes and
SyntheticTextures, specs, loaders."""
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from dinolite.data import (
    SHAPE_CLASSES,
    TEXTURE_CLASSES,
    EvalTransform,
    ImageFolderDataset,
    MultiCropAugmentation,
    SyntheticShapes,
    SyntheticTextures,
    build_dataset,
)


def save(image, path, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kw)
    return path


def photo(seed=0, size=(24, 16)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture
def messy_folder(tmp_path):
    """Two classes with good images in many modes, plus a corrupt and two truncated files."""
    root = tmp_path / "data"
    save(photo(0), root / "dogs" / "a.jpg")
    save(photo(1).convert("L"), root / "dogs" / "gray.png")
    rgba = photo(2).convert("RGBA")
    rgba.putalpha(0)
    save(rgba, root / "cats" / "rgba.PNG")
    save(photo(3).convert("CMYK"), root / "cats" / "cmyk.jpeg")
    save(photo(4).convert("P"), root / "cats" / "nested" / "palette.gif")
    (root / "cats" / "corrupt.jpg").write_bytes(b"this is not an image at all" * 10)
    full = save(photo(5, (64, 64)), root / "dogs" / "truncated.jpg", quality=95).read_bytes()
    (root / "dogs" / "truncated.jpg").write_bytes(full[: len(full) // 2])
    png = save(photo(6, (64, 64)), root / "dogs" / "truncated.png").read_bytes()
    (root / "dogs" / "truncated.png").write_bytes(png[: len(png) // 2])
    (root / "dogs" / "notes.txt").write_text("not an image extension: ignored")
    return root


def test_folder_dataset_labels_modes_and_broken_files(messy_folder):
    with pytest.warns(UserWarning, match="corrupt.jpg") as record:
        ds = ImageFolderDataset(messy_folder)
    assert len(record) == 1  # one warning for all files skipped while indexing
    assert "truncated.png" in str(record[0].message)  # PNG truncation is caught by verify()
    assert [p.name for p in ds.skipped] == ["corrupt.jpg", "truncated.png"]
    assert ds.classes == ["cats", "dogs"] and ds.num_classes == 2
    names = {p.name: label for p, label in ds.samples}
    assert names == {"cmyk.jpeg": 0, "palette.gif": 0, "rgba.PNG": 0, "a.jpg": 1, "gray.png": 1, "truncated.jpg": 1}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = [ds[i] for i in range(len(ds))]
    # The truncated JPEG passes the cheap check but fails to decode: warned about once, replaced.
    assert len(caught) == 1 and "truncated.jpg" in str(caught[0].message)
    for (image, label), (path, expected_label) in zip(items, ds.samples):
        assert image.mode == "RGB"
        if path.name != "truncated.jpg":
            assert label == expected_label
    by_name = dict(zip([p.name for p, _ in ds.samples], [im for im, _ in items]))
    assert np.all(np.asarray(by_name["rgba.PNG"]) == 255)  # fully transparent -> white
    gray = np.asarray(by_name["gray.png"])
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second pass warns no more
        _ = [ds[i] for i in range(len(ds))]


def test_folder_dataset_transform_and_unlabelled(tmp_path):
    for i in range(3):
        save(photo(i), tmp_path / f"img{i}.webp")
    ds = ImageFolderDataset(tmp_path, transform=EvalTransform(resize_size=None, crop_size=16))
    assert len(ds) == 3 and ds.classes == [] and ds.num_classes == 0
    image, label = ds[0]
    assert label == -1 and tuple(image.shape) == (3, 16, 16) and image.dtype == torch.float32


def test_folder_dataset_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        ImageFolderDataset(tmp_path / "does_not_exist")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.md").write_text("no images")
    with pytest.raises(ValueError, match=r"no images found under .*empty.*\.jpg"):
        ImageFolderDataset(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"junk")
    with pytest.raises(ValueError, match="could be read"), pytest.warns(UserWarning):
        ImageFolderDataset(tmp_path / "bad")


def test_synthetic_shapes_deterministic_and_independent_of_length():
    a = SyntheticShapes(num_images=50, image_size=32, seed=0)
    b = SyntheticShapes(num_images=1000, image_size=32, seed=0)
    c = SyntheticShapes(num_images=50, image_size=32, seed=1)
    for i in (0, 7, 49):
        ia, la, ma = a.generate(i)
        ib, lb, mb = b.generate(i)
        assert np.array_equal(ia, ib) and la == lb and np.array_equal(ma, mb)
        assert not np.array_equal(ia, c.generate(i)[0])
    assert not np.array_equal(a.generate(0)[0], a.generate(12)[0])  # same class, different image
    with pytest.raises(IndexError):
        a.generate(50)


def test_synthetic_shapes_classes_balanced_and_masks_consistent():
    ds = SyntheticShapes(num_images=240, image_size=48, seed=0, return_mask=True)
    assert ds.num_classes == len(SHAPE_CLASSES) >= 10
    labels = []
    contrast = []
    for i in range(len(ds)):
        image, label, mask = ds[i]
        labels.append(label)
        assert isinstance(image, Image.Image) and image.size == (48, 48) and image.mode == "RGB"
        assert mask.dtype == torch.int64 and mask.shape == (48, 48)
        assert set(mask.unique().tolist()) == {0, label + 1}
        fraction = (mask > 0).float().mean().item()
        assert 0.01 < fraction < 0.75, (i, fraction)
        pixels = np.asarray(image, dtype=np.float32) / 255
        inside, outside = pixels[mask.numpy() > 0], pixels[mask.numpy() == 0]
        contrast.append(np.linalg.norm(inside.mean(0) - outside.mean(0)))
    assert np.bincount(labels, minlength=ds.num_classes).tolist() == [240 // ds.num_classes] * ds.num_classes
    # The shape's colour stands out from the background in (almost) every image.
    contrast = np.array(contrast)
    assert np.median(contrast) > 0.3 and (contrast > 0.1).mean() > 0.95


def test_synthetic_shapes_silhouettes_identify_the_class():
    """Same pose, different classes: silhouettes differ. Same class, any pose: areas stay in a band."""
    from dinolite.data.synthetic import shape_mask

    grid = np.linspace(-1.2, 1.2, 96, dtype=np.float32)
    y, x = np.meshgrid(grid, grid, indexing="ij")
    masks = np.stack([shape_mask(c, x, y) for c in range(len(SHAPE_CLASSES))]).reshape(len(SHAPE_CLASSES), -1)
    differences = (masks[:, None] != masks[None]).mean(-1)
    off_diagonal = differences[~np.eye(len(SHAPE_CLASSES), dtype=bool)]
    assert off_diagonal.min() > 0.02  # every pair of classes differs on > 2% of the canvas
    # ring has a hole, circle does not
    ring, circle = SHAPE_CLASSES.index("ring"), SHAPE_CLASSES.index("circle")
    centre = masks.reshape(len(SHAPE_CLASSES), 96, 96)[:, 48, 48]
    assert centre[circle] and not centre[ring]


def test_synthetic_shapes_any_resolution_and_transform():
    for size in (17, 96):
        image, label, mask = SyntheticShapes(num_images=3, image_size=size, return_mask=True)[1]
        assert image.size == (size, size) and mask.shape == (size, size) and label == 1
    ds = SyntheticShapes(num_images=4, image_size=64, transform=MultiCropAugmentation.from_preset("small"))
    crops, label = ds[2]
    assert tuple(crops["global_crops"][0].shape) == (3, 64, 64) and label == 2
    with pytest.raises(ValueError, match="image_size"):
        SyntheticShapes(image_size=4)


def test_synthetic_shapes_speed():
    ds = SyntheticShapes(num_images=1000, image_size=64)
    start = time.perf_counter()
    for i in range(1000):
        ds.generate(i)
    assert time.perf_counter() - start < 6.0  # i.e. 10k images in well under a minute


def test_synthetic_shapes_plain_style_solid_shapes_on_smooth_gradients():
    full = SyntheticShapes(num_images=60, image_size=32, seed=0, return_mask=True)
    plain = SyntheticShapes(num_images=60, image_size=32, seed=0, return_mask=True, style="plain")
    again = SyntheticShapes(num_images=500, image_size=32, seed=0, style="plain")
    assert full.style == "full" and plain.style == "plain"
    full_rough, plain_rough = [], []
    for i in range(len(plain)):
        image, label, mask = plain[i]
        assert label == i % 12 and set(mask.unique().tolist()) == {0, label + 1}
        pixels = np.asarray(image).astype(np.int64)
        inside = mask.numpy() > 0
        assert len(np.unique(pixels[inside], axis=0)) == 1  # one solid colour on the shape
        np.testing.assert_array_equal(again.generate(i)[0], pixels)  # deterministic, independent of length
        # A linear gradient has (almost) zero second differences away from the shape's edges.
        for ds, rough in ((plain, plain_rough), (full, full_rough)):
            image, _, mask = ds.generate(i)
            outside = mask == 0
            away = outside[:, :-2] & outside[:, 1:-1] & outside[:, 2:]
            image = image.astype(np.int64)
            second = np.abs(image[:, :-2] - 2 * image[:, 1:-1] + image[:, 2:]).max(-1)
            rough.append(second[away].max())
    assert max(plain_rough) <= 2  # uint8 rounding only: no texture, no noise
    assert np.median(full_rough) > 20  # the full style has textures and noise
    assert not np.array_equal(plain.generate(0)[0], full.generate(0)[0])
    with pytest.raises(ValueError, match="full, plain"):
        SyntheticShapes(num_images=4, style="easy")


def test_synthetic_textures_deterministic_balanced_gray():
    a, b = SyntheticTextures(60, 32, seed=0), SyntheticTextures(600, 32, seed=0)
    for i in (0, 11, 59):
        assert np.array_equal(a.generate(i)[0], b.generate(i)[0]) and a.generate(i)[1] == b.generate(i)[1]
        assert not np.array_equal(a.generate(i)[0], SyntheticTextures(60, 32, seed=1).generate(i)[0])
    labels = [a[i][1] for i in range(60)]
    assert labels == [i % 12 for i in range(60)] and len(TEXTURE_CLASSES) == 12
    image = np.asarray(a[5][0])
    assert image.shape == (32, 32, 3) and np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 1], image[..., 2])
    assert a.replace(seed=4).seed == 4 and a.replace(num_images=3).image_size == 32 and len(a.replace(num_images=3)) == 3
    with pytest.raises(IndexError):
        a.generate(60)
    with pytest.raises(ValueError, match="image_size >= 8"):
        SyntheticTextures(10, 4)


def test_synthetic_textures_patterns_have_their_class_structure():
    """Mean |vertical| vs |horizontal| pixel differences separate stripe directions; the
    gradient class has no edges; every patterned class has two well separated gray levels."""
    ds = SyntheticTextures(12 * 20, 64, seed=2)
    by_class = {name: [] for name in TEXTURE_CLASSES}
    for i in range(len(ds)):
        image, label = ds.generate(i)
        g = image[..., 0].astype(np.float64) / 255
        dy, dx = np.abs(np.diff(g, axis=0)).mean(), np.abs(np.diff(g, axis=1)).mean()
        coarse = g.reshape(16, 4, 16, 4).mean(axis=(1, 3))  # 4x4 means: the pixel noise averages out
        jump = max(np.abs(np.diff(coarse, axis=0)).max(), np.abs(np.diff(coarse, axis=1)).max())
        by_class[TEXTURE_CLASSES[label]].append((dy, dx, np.percentile(g, 90) - np.percentile(g, 10), jump))
    mean = {k: np.mean(v, axis=0) for k, v in by_class.items()}
    assert mean["horizontal stripes"][0] > 2.5 * mean["horizontal stripes"][1]
    assert mean["vertical stripes"][1] > 2.5 * mean["vertical stripes"][0]
    assert 0.6 < mean["diagonal stripes"][0] / mean["diagonal stripes"][1] < 1.6
    assert np.max(by_class["gradient"], axis=0)[3] < 0.12  # no edges: at most the ramp (<= 1/16 per step) + noise
    assert min(m[3] for k, m in mean.items() if k != "gradient") > 0.2  # every pattern has edges
    for name, (_, _, spread, _) in mean.items():
        if name != "gradient":
            assert spread > 0.2, name  # dark vs light level at least 0.2 apart


def test_synthetic_textures_speed():
    ds = SyntheticTextures(num_images=1000, image_size=32)
    start = time.perf_counter()
    for i in range(1000):
        ds.generate(i)
    assert time.perf_counter() - start < 3.0


def test_build_dataset_specs(tmp_path):
    ds = build_dataset("builtin")
    assert isinstance(ds, SyntheticShapes) and (len(ds), ds.image_size, ds.seed) == (10000, 64, 0)
    ds = build_dataset("builtin:n=20,size=32,seed=3", return_mask=True)
    assert (len(ds), ds.image_size, ds.seed, ds.return_mask, ds.style) == (20, 32, 3, True, "full")
    ds = build_dataset("builtin:n=20,size=32,style=plain")
    assert ds.style == "plain" and np.array_equal(ds.generate(5)[0],
                                                  SyntheticShapes(20, 32, 0, style="plain").generate(5)[0])
    ds = build_dataset("textures:n=24,size=16,seed=5")
    assert isinstance(ds, SyntheticTextures) and (len(ds), ds.image_size, ds.seed) == (24, 16, 5)
    assert np.array_equal(ds.generate(3)[0], SyntheticTextures(24, 16, 5).generate(3)[0])
    assert (len(build_dataset("textures")), build_dataset("textures").image_size) == (10000, 32)
    save(photo(0), tmp_path / "pics" / "a" / "x.png")
    save(photo(1), tmp_path / "pics" / "b" / "y.png")
    for spec in (f"folder:{tmp_path / 'pics'}", str(tmp_path / "pics")):
        ds = build_dataset(spec)
        assert isinstance(ds, ImageFolderDataset) and ds.classes == ["a", "b"]
    for bad, message in [("builtin:n=ten", "integer"), ("builtin:images=5", "unknown builtin option"),
                         ("builtin:style=easy", "style must be one of full, plain"),
                         ("textures:style=plain", "unknown textures option"), ("textures:n=1.5", "integer"),
                         ("imagenet:/data", "not a known dataset"), ("folder:", "needs a path"), ("", "empty")]:
        with pytest.raises(ValueError, match=message) as info:
            build_dataset(bad)
        assert "cifar10:ROOT" in str(info.value) and "builtin:n=2000" in str(info.value)  # lists the valid forms


@pytest.mark.parametrize("name, hint", [("cifar10", "cifar-10-python.tar.gz"), ("stl10", "stl10_binary.tar.gz"),
                                        ("imagenette", "imagenette2-160.tgz")])
def test_missing_torchvision_dataset_says_how_to_get_it(tmp_path, name, hint):
    with pytest.raises(FileNotFoundError) as info:
        build_dataset(f"{name}:{tmp_path}")
    message = str(info.value)
    assert hint in message and "download=True" in message and str(tmp_path) in message


def test_cifar10_wrapper_reads_a_local_copy(tmp_path, monkeypatch):
    """A tiny fake CIFAR-10 in the real on-disk format (pickled batches) loads as (RGB PIL, int)."""
    import pickle

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), "labels": [3, 7]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    import torchvision.datasets.cifar

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kw: True)  # fake md5s
    ds = build_dataset(f"cifar10:{tmp_path}")
    assert len(ds) == 10 and ds.num_classes == 10
    image, label = ds[1]
    assert image.mode == "RGB" and image.size == (32, 32) and label == 7


# ----------------------------------------------------------------------------- PhotoMosaics


def _solid_and_ramp_photos(mosaics):
    """Replace the photos by same-sized fakes: photo k has red = its column as a 0..255 ramp, green = 40 k.
    Bicubic resizing keeps a constant channel constant and a linear ramp between its end values."""
    fakes = []
    for k, photo in enumerate(mosaics.photos):
        height, width = photo.shape[:2]
        fake = np.zeros((height, width, 3), dtype=np.uint8)
        fake[..., 0] = np.round(np.arange(width) * 255 / (width - 1)).astype(np.uint8)
        fake[..., 1] = 40 * k
        fakes.append(fake)
    mosaics.photos = fakes
    return mosaics


def test_photo_mosaics_label_every_pixel_with_the_photo_it_shows():
    from dinolite.data import PHOTO_NAMES, PhotoMosaics

    for split in ("train", "held-out"):
        mosaics = _solid_and_ramp_photos(PhotoMosaics(40, 48, split, seed=5))
        assert mosaics.num_classes == len(PHOTO_NAMES) == 6
        seen = set()
        for i in range(len(mosaics)):
            image, label, mask = mosaics[i]
            green = np.asarray(image)[..., 1].astype(np.int64)
            assert mask.shape == (48, 48) and mask.dtype == torch.int64
            assert torch.equal(torch.from_numpy(green), 40 * mask), "a pixel's label is not the photo it came from"
            values = mask.unique().tolist()
            assert len(values) == 2 and label in values  # the background photo and a shape from another one
            assert (mask == label).float().mean() > 0.2  # the shape never covers the whole image
            seen.update(values)
        assert seen == set(range(6))


def test_photo_mosaics_held_out_crops_come_from_other_columns():
    """Training crops lie in the left 60% of each photo, held-out crops in the right 40%: the red ramp (the
    column) stays below 0.6 * 255 for training mosaics and above it for held-out ones (+-2 for rounding)."""
    from dinolite.data import PhotoMosaics

    red = {split: np.stack([np.asarray(_solid_and_ramp_photos(PhotoMosaics(30, 32, split, seed=1))[i][0])[..., 0]
                            for i in range(30)]) for split in ("train", "held-out")}
    assert red["train"].max() <= 0.6 * 255 + 2 and red["held-out"].min() >= 0.6 * 255 - 2
    assert red["train"].min() <= 20 and red["held-out"].max() >= 235  # the splits reach the photos' edges


def test_photo_mosaics_deterministic_and_clear_errors():
    from dinolite.data import DataError, PhotoMosaics

    a, b = PhotoMosaics(5, 32, "held-out", seed=3), PhotoMosaics(9, 32, "held-out", seed=3)
    for i in range(5):
        assert np.array_equal(np.asarray(a[i][0]), np.asarray(b[i][0])) and torch.equal(a[i][2], b[i][2])
    assert not np.array_equal(np.asarray(a[0][0]), np.asarray(PhotoMosaics(5, 32, "train", seed=3)[0][0]))
    assert not np.array_equal(np.asarray(a[0][0]), np.asarray(PhotoMosaics(5, 32, "held-out", seed=4)[0][0]))
    with pytest.raises(DataError, match="split must be one of train, held-out"):
        PhotoMosaics(5, 32, "test")
    with pytest.raises(DataError, match="image_size >= 8"):
        PhotoMosaics(5, 4)
    with pytest.raises(IndexError):
        a[5]
