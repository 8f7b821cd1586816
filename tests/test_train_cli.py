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
