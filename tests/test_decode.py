"""JPEGs decoded at reduced size (PIL draft mode) when the crops are small: the sizes, the pixels, the rule."""
import math

import numpy as np
import pytest
from PIL import Image

from dinolite.data import ImageFolderDataset
from dinolite.data.datasets import reduce_while_decoding
from dinolite.train import apply_overrides, get_config
from dinolite.train.config import Config
from dinolite.train.data import decode_side
from dinolite.train.run import training_data


def _photo(path, size=(800, 600), fmt="JPEG"):
    """A smooth synthetic 'photo' (gradients and a disc): JPEG at quality 95."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    disc = ((x - 0.4) ** 2 + (y - 0.3) ** 2 < 0.04).astype(float)
    pixels = np.stack([x, y, 0.5 * disc + 0.25 * (x + y)], axis=-1) * 255
    Image.fromarray(pixels.astype(np.uint8)).save(path, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return path


def _decoded_size(path, min_side):
    with Image.open(path) as image:
        reduce_while_decoding(image, min_side)
        image.load()
        return image.size


@pytest.mark.parametrize("min_side, size", [
    (0, (800, 600)),     # off
    (100, (200, 150)),   # 1/4: 150 >= 100, while 1/8 (75) would be too small
    (250, (400, 300)),   # 1/2
    (400, (800, 600)),   # even 1/2 (300) is too small: whole
    (70, (100, 75)),     # 1/8
])
def test_jpeg_reduced_to_the_smallest_scale_that_keeps_min_side(tmp_path, min_side, size):
    assert _decoded_size(_photo(tmp_path / "a.jpg"), min_side) == size


def test_other_formats_are_decoded_whole(tmp_path):
    assert _decoded_size(_photo(tmp_path / "a.png", fmt="PNG"), 100) == (800, 600)


def test_reduced_decoding_matches_a_full_decode_scaled_down(tmp_path):
    path = _photo(tmp_path / "a.jpg")
    with Image.open(path) as image:
        reduce_while_decoding(image, 100)
        small = np.asarray(image.convert("RGB"), dtype=float)
    full = np.asarray(Image.open(path).convert("RGB").resize((200, 150), Image.Resampling.BOX), dtype=float)
    # the DCT's own 1/4 scaling vs a 4x4 box average of the full decode: both average 4x4 blocks of the same image
    assert np.abs(small - full).mean() < 2.0


def test_decode_side_by_hand():
    # DINOv2 defaults: 224 px globals from >= 32 % of the area, 98 px locals from >= 5 %
    assert decode_side(Config()) == math.ceil(max(224 / math.sqrt(0.75 * 0.32), 98 / math.sqrt(0.75 * 0.05))) == 507
    assert decode_side(get_config("tiny-cpu")) == math.ceil(32 / math.sqrt(0.75 * 0.4)) == 59
    highres = get_config("dinov3-tiny-cpu-highres")  # the larger of its size pairs (48 px globals) and Gram crops
    assert decode_side(highres) >= math.ceil(48 / math.sqrt(0.75 * highres.crops.global_scale_min))


def test_training_data_decodes_folder_jpegs_at_the_crops_size(tmp_path):
    (tmp_path / "photos").mkdir()
    for i in range(2):
        _photo(tmp_path / "photos" / f"{i}.jpg")
    cfg = apply_overrides(get_config("tiny-cpu"), ["train.batch_size=2"])
    dataset, _ = training_data(f"folder:{tmp_path / 'photos'}", cfg, knn_data=None)
    assert dataset.draft_side == 59
    assert dataset[0][0].size == (100, 75)  # 1/8 of 800 x 600: 75 >= 59
    assert ImageFolderDataset(tmp_path / "photos")[0][0].size == (800, 600)  # the library default: whole
