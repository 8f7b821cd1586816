"""The file index of folder:/list: data: built once (rank 0), saved in the run directory, broadcast, reused."""
import json

import pytest
from PIL import Image

from dinolite.data import DataError, build_dataset
from dinolite.data import index as file_index
from dinolite.data.index import INDEX_FILE, build_index, indexed_dataset
from tests.cli_helpers import colour_folder
from tests.distributed_utils import run_distributed


def _folder(tmp_path):
    root = colour_folder(tmp_path / "photos", ["blue", "red"], per_class=3)
    (root / "red" / "broken.png").write_bytes(b"not a png")
    return root


def _samples(dataset):
    return [(str(p), label) for p, label in dataset.samples]


def test_verified_index_equals_the_folder_dataset(tmp_path):
    root = _folder(tmp_path)
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        reference = build_dataset(f"folder:{root}")
        index = build_index(f"folder:{root}", verify=True)
    assert [tuple(s) for s in index["samples"]] == _samples(reference) and index["classes"] == ["blue", "red"]
    assert index["skipped"] == [str(root / "red" / "broken.png")]


def test_unverified_index_opens_no_image(tmp_path, monkeypatch):
    root = _folder(tmp_path)
    monkeypatch.setattr(Image, "open", lambda *a, **k: pytest.fail("an image was opened"))
    index = build_index(f"folder:{root}", verify=False)
    assert len(index["samples"]) == 7 and [label for _, label in index["samples"]] == [0, 0, 0, 1, 1, 1, 1]


def test_index_is_saved_and_reused_without_walking_again(tmp_path, monkeypatch):
    root, run = _folder(tmp_path), tmp_path / "run"
    lines = []
    first = indexed_dataset(f"folder:{root}", str(run), verify=False, log=lines.append)
    saved = json.loads((run / INDEX_FILE).read_text())
    assert saved["spec"] == f"folder:{root}" and len(saved["samples"]) == 7 and "indexed 7 images" in lines[0]
    def walk(*args):
        raise RuntimeError("walked the folder again")

    monkeypatch.setattr(file_index, "build_index", walk)
    again = indexed_dataset(f"folder:{root}", str(run), verify=False, log=lines.append)
    assert _samples(again) == _samples(first) and again.classes == first.classes and "reusing" in lines[1]
    image, label = again[0]
    assert image.size == (40, 40) and label == 0
    with pytest.raises(RuntimeError, match="walked the folder again"):  # a verifying run does not trust it
        indexed_dataset(f"folder:{root}", str(run), verify=True, log=lines.append)


def test_a_list_spec_is_indexed_too(tmp_path):
    root = colour_folder(tmp_path / "photos", ["blue", "red"], per_class=2)
    listing = tmp_path / "list.txt"
    listing.write_text("photos/blue/0.png\t0\nphotos/red/1.png\t1\n")
    dataset = indexed_dataset(f"list:{listing}", str(tmp_path / "run"), verify=True, log=lambda line: None)
    assert _samples(dataset) == [(str(root / "blue/0.png"), 0), (str(root / "red/1.png"), 1)]
    assert type(dataset).__name__ == "ImageListDataset"


def _rank_index(rank, world, root, run):
    lines = []
    dataset = indexed_dataset(f"folder:{root}", run, verify=True, log=lines.append)
    try:
        indexed_dataset(f"folder:{root}/missing", run + "2", verify=True)
        error = None
    except DataError as e:
        error = str(e)
    return {"samples": _samples(dataset), "lines": lines, "error": error}


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_rank_0_indexes_and_broadcasts(tmp_path):
    root = _folder(tmp_path)
    results = run_distributed(_rank_index, world_size=2, args=(str(root), str(tmp_path / "run")))
    assert results[0]["samples"] == results[1]["samples"] and len(results[0]["samples"]) == 6  # broken.png skipped
    assert len(results[0]["lines"]) == 1 and results[1]["lines"] == []  # only rank 0 walked
    assert results[0]["error"] == results[1]["error"] and "does not exist" in results[1]["error"]  # no rank hangs
