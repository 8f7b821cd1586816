"""kNN on your own photo folders: a held-out split of a labelled folder, train.knn_data=folder:VAL, and a one-line
notice when a run has no labels for kNN."""
import json

import pytest
from PIL import Image

from dinolite.data import build_dataset
from dinolite.train import apply_overrides, get_config
from dinolite.train.__main__ import main
from dinolite.train.run import knn_datasets, training_data
from tests.cli_helpers import colour_folder, one_error_line
from tests.tiny_runs import TINY

RUN = [o for o in TINY if not o.startswith(("train.knn_train_size", "train.knn_test_size", "train.epoch_length"))] + [
    "train.epoch_length=2", "train.knn_train_size=0", "train.knn_test_size=0"]


def _cfg(*overrides):
    return apply_overrides(get_config("tiny-cpu"), [*RUN, *overrides])


def _paths(subset):
    return [subset.dataset.samples[i][0] for i in subset.indices]


def test_held_out_split_of_a_labelled_folder(tmp_path):
    folder = colour_folder(tmp_path / "photos", ["blue", "green", "red"], per_class=10)
    dataset = build_dataset(f"folder:{folder}")
    memory, queries = knn_datasets(dataset, _cfg())
    assert len(queries) == 30 // 5 and len(memory) == 24  # a fifth held out, the rest is the memory
    assert not set(_paths(memory)) & set(_paths(queries))
    image, label = queries[0]
    assert tuple(image.shape) == (3, 32, 32)  # resized and cropped to crops.global_size
    assert dataset.classes[label] == _paths(queries)[0].parent.name
    assert dataset.transform is None  # the training dataset is untouched (the kNN reads a copy)
    memory, queries = knn_datasets(dataset, _cfg("train.knn_test_size=3", "train.knn_train_size=5"))
    assert (len(memory), len(queries)) == (5, 3)


def test_knn_data_names_a_validation_folder(tmp_path):
    train = colour_folder(tmp_path / "train", ["blue", "red"], per_class=6)
    val = colour_folder(tmp_path / "val", ["blue", "red"], per_class=3, seed=1)
    memory, queries = knn_datasets(build_dataset(f"folder:{train}"), _cfg(f"train.knn_data=folder:{val}"))
    assert len(memory) == 12 and len(queries) == 6
    assert {p.parent.parent for p in _paths(queries)} == {val}
    # an unlabelled photo folder: the labelled kNN folder is split into memory and queries
    (tmp_path / "unlabelled").mkdir()
    for i in range(4):
        Image.new("RGB", (40, 40), (i * 50, 0, 0)).save(tmp_path / "unlabelled" / f"{i}.png")
    memory, queries = knn_datasets(build_dataset(f"folder:{tmp_path / 'unlabelled'}"), _cfg(f"train.knn_data=folder:{val}"))
    assert (len(memory), len(queries)) == (5, 1) and not set(_paths(memory)) & set(_paths(queries))


def test_other_classes_in_knn_data_is_a_one_line_error(tmp_path, capsys):
    train = colour_folder(tmp_path / "train", ["blue", "red"], per_class=8)
    val = colour_folder(tmp_path / "val", ["blue", "green"], per_class=2)
    code = main(["--config", "tiny-cpu", "--data", f"folder:{train}", "--output-dir", str(tmp_path / "run"), *RUN,
                 f"train.knn_data=folder:{val}"])
    assert code == 2 and "has classes ['blue', 'green'] but the training data has ['blue', 'red']" in one_error_line(capsys)


def test_unlabelled_folder_gives_a_one_line_notice(tmp_path):
    (tmp_path / "photos").mkdir()
    for i in range(3):
        Image.new("RGB", (40, 40), (0, i * 60, 0)).save(tmp_path / "photos" / f"{i}.png")
    lines = []
    _, knn = training_data(f"folder:{tmp_path / 'photos'}", _cfg(), log=lines.append)
    assert knn is None and len(lines) == 1 and "train.knn_data=folder:VAL" in lines[0]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_run_on_a_labelled_folder_logs_knn(tmp_path, capsys):
    folder = colour_folder(tmp_path / "photos", ["blue", "green", "red"], per_class=8)
    assert main(["--config", "tiny-cpu", "--data", f"folder:{folder}", "--output-dir", str(tmp_path / "run"),
                 *RUN]) == 0
    assert "teacher kNN top-1" in capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "knn_top1" in r] == [0, 2]
