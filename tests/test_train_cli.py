"""`python -m dinolite.train` end to end in a subprocess, and its argument errors."""
import json
import os
import subprocess
import sys

import pytest

from dinolite.train.__main__ import main

TINY = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "head.dino_out_dim=64", "head.ibot_out_dim=64",
        "head.hidden_dim=64", "head.bottleneck_dim=32", "crops.n_local=2", "train.batch_size=8", "train.epochs=1",
        "train.epoch_length=3", "train.knn_every=3", "train.knn_train_size=24", "train.knn_test_size=12",
        "train.checkpoint_every=2", "train.log_every=1", "train.monitor_every=3", "train.num_workers=0"]


def test_cli_trains_logs_checkpoints_and_exports(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dinolite.train", "--config", "tiny-cpu", "--data", "builtin:n=32,size=32",
           "--output-dir", str(out), *TINY]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done: 3/3 steps" in result.stdout
    assert "teacher kNN top-1" in result.stdout
    assert "training" in result.stderr  # the tqdm bar
    files = sorted(os.listdir(out))
    assert {"config.yaml", "metrics.jsonl", "teacher_backbone_official.pth", "checkpoint_00000003.pth"} <= set(files)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert [r["step"] for r in records if "knn_top1" in r] == [0, 3]  # at initialisation and at the end


def test_cli_rejects_bad_override_naming_the_key(capsys):
    code = main(["--config", "tiny-cpu", "--data", "builtin", "--output-dir", "/nonexistent", "optim.base_lrr=1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "'optim.base_lrr'" in err and "'optim.base_lr'" in err


def test_cli_print_config(capsys):
    assert main(["--config", "tiny-cpu", "--data", "builtin", "--output-dir", "x", "--print-config", "model.depth=3"]) == 0
    assert "depth: 3" in capsys.readouterr().out


def test_cli_requires_config():
    with pytest.raises(SystemExit):
        main(["--data", "builtin", "--output-dir", "x"])


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize("make_data, expected", [
    (lambda root: f"folder:{root / 'missing'}", "missing does not exist; give the path of a directory of images"),
    (lambda root: (root / "empty").mkdir() or f"folder:{root / 'empty'}", "no images found under"),
    (lambda root: (root / "a.txt").write_text("x") and str(root / "a.txt"), "not a known dataset kind"),
    (lambda root: f"cifar10:{root}", "dinolite never downloads data itself; get it with"),
    (lambda root: "textures:n=0", "needs num_images >= 1"),
    (lambda root: "builtin:n=lots", "must be an integer"),
    (lambda root: "textures:n=6,size=32", "the dataset has 6 images, fewer than one global batch "
                                          "(train.batch_size=8 x 1 processes); set train.batch_size=6 (or less)"),
], ids=["missing folder", "empty folder", "a file", "cifar10 not downloaded", "no images", "bad spec",
        "fewer images than a batch"])
def test_cli_data_error_is_one_line_and_exit_2(tmp_path, capsys, make_data, expected):
    out = tmp_path / "run"
    code = main(["--config", "tiny-cpu", "--data", make_data(tmp_path), "--output-dir", str(out), *TINY])
    assert code == 2
    assert expected in _one_error_line(capsys)
    assert not (out / "config.yaml").exists()  # nothing that would stand in the way of the fixed command


def test_cli_data_error_in_a_subprocess_has_no_traceback(tmp_path):
    cmd = [sys.executable, "-m", "dinolite.train", "--config", "tiny-cpu", "--data", str(tmp_path / "no_such_dir"),
           "--output-dir", str(tmp_path / "run")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2
    assert result.stderr.startswith("error: bad --data spec") and result.stderr.count("\n") == 1, result.stderr


def test_cli_retry_with_the_batch_size_the_error_recommends(tmp_path, capsys):
    args = ["--config", "tiny-cpu", "--data", "textures:n=6,size=32", "--output-dir", str(tmp_path / "run"), *TINY,
            "train.knn_every=0", "train.progress=false"]
    assert main(args) == 2
    fix = _one_error_line(capsys).split("; set ")[1].split(" ")[0]
    assert fix == "train.batch_size=6"
    assert main(args + [fix]) == 0
    assert "done: 3/3 steps" in capsys.readouterr().out
    # The directory now holds checkpoints: another config is refused, as one line, and nothing changes.
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert main(args + ["train.batch_size=4"]) == 2
    assert "holds a run with a different config (train.batch_size: saved 6 vs now 4)" in _one_error_line(capsys)
    assert (tmp_path / "run" / "config.yaml").read_text() == saved


def test_cli_output_dir_that_cannot_be_a_directory(tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    for out, expected in [(tmp_path / "a_file", "is a file; give the path of a directory"),
                          (tmp_path / "a_file" / "run", "cannot create output directory")]:
        code = main(["--config", "tiny-cpu", "--data", "textures:n=16,size=32", "--output-dir", str(out), *TINY])
        assert code == 2
        assert expected in _one_error_line(capsys)
    assert (tmp_path / "a_file").read_text() == "x"


def test_cli_malformed_yaml_config(tmp_path, capsys):
    (tmp_path / "recipe.yaml").write_text("train:\n  batch_size: [8\n")
    assert main(["--config", str(tmp_path / "recipe.yaml"), "--data", "textures", "--output-dir", str(tmp_path)]) == 2
    assert "recipe.yaml is not valid YAML at line" in _one_error_line(capsys)
