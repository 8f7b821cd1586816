"""Issue 26 (practice at scale): the data spec a run records, --print-config with --config alone, one-line data
errors for list: files, torchrun with dinolite.train, a scale run's config.yaml read back by dinolite."""
import os
import subprocess
import sys

import pytest
import yaml

from dinolite.data.spec import absolute_spec, read_data_spec
from dinolite.train.__main__ import main
from dinolite.train.recipes import get_config
from tests.cli_helpers import ROOT, one_error_line, run_module


def test_print_config_needs_only_config(capsys):
    assert main(["--config", "tiny-cpu", "--print-config", "model.depth=3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["depth"] == 3 and printed["model"]["embed_dim"] == get_config("tiny-cpu").model.embed_dim


def test_training_still_needs_data_and_output_dir(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", "tiny-cpu"])
    assert exit_info.value.code == 2
    assert "--data and --output-dir are required" in capsys.readouterr().err


@pytest.mark.parametrize("lines, expected", [
    (None, "image list"),  # the list file itself is missing
    (["a.png"], "line 1: image"),
    (["#only a comment", ""], "names no images"),
])
def test_list_spec_errors_are_one_line_with_exit_2(tmp_path, capsys, lines, expected):
    listing = tmp_path / "images.txt"
    if lines is not None:
        listing.write_text("\n".join(lines) + "\n")
    code = main(["--config", "tiny-cpu", "--data", f"list:{listing}", "--output-dir", str(tmp_path / "run")])
    assert code == 2
    line = one_error_line(capsys)
    assert expected in line and str(listing) in line


def test_binary_list_file_is_a_one_line_error(tmp_path, capsys):
    listing = tmp_path / "images.txt"
    listing.write_bytes(bytes([0xff, 0xfe, 0x00, 0x80]) * 10)
    assert main(["--config", "tiny-cpu", "--data", f"list:{listing}", "--output-dir", str(tmp_path / "run")]) == 2
    assert "cannot read image list" in one_error_line(capsys)


def test_torchrun_world_size_is_a_one_line_error_pointing_to_scale(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    code = main(["--config", "tiny-cpu", "--data", "textures:n=64", "--output-dir", str(tmp_path / "run")])
    assert code == 2
    line = one_error_line(capsys)
    assert "WORLD_SIZE=2" in line and "scale/train.py" in line
    assert not (tmp_path / "run").exists()  # nothing written


def test_subprocess_print_config_and_torchrun_error(tmp_path):
    result = run_module("dinolite.train", "--config", "tiny-cpu", "--print-config")
    assert result.returncode == 0 and "model:" in result.stdout
    env = {**os.environ, "WORLD_SIZE": "2", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "dinolite.train", "--config", "tiny-cpu", "--data", "textures",
                             "--output-dir", str(tmp_path / "run")], capture_output=True, text=True, env=env,
                            cwd=ROOT, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error: ") and len(result.stderr.strip().splitlines()) == 1


def test_a_scale_run_config_is_read_back_by_dinolite(scale_run, capsys):
    config = scale_run / "config.yaml"
    assert "dist" in yaml.safe_load(config.read_text())
    assert main(["--config", str(config), "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert "dist" not in printed and printed["model"]["depth"] == 2 and printed["model"]["embed_dim"] == 48
    result = run_module("dinolite.curate", "--help")  # curate reads --config through the same loader
    assert result.returncode == 0
    from dinolite.train.recipes import get_config as load
    assert load(str(config)).model.embed_dim == 48


def test_every_trainer_records_its_data_spec(tiny_run, distill_run, scale_run):
    from tests.tiny_runs import DATA
    for run in (tiny_run[0], distill_run[0], scale_run):
        assert read_data_spec(str(run)) == DATA
    assert read_data_spec(str(tiny_run[0].parent)) is None


def test_absolute_spec_makes_paths_hold_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    assert absolute_spec("folder:photos") == f"folder:{tmp_path / 'photos'}"
    assert absolute_spec("photos") == f"folder:{tmp_path / 'photos'}"
    assert absolute_spec("list:a/b.txt") == f"list:{tmp_path / 'a/b.txt'}"
    assert absolute_spec("textures:n=10") == "textures:n=10"


def test_report_finds_the_runs_images_without_data(tiny_run):
    from dinolite.report import build_report
    page, problems = build_report(str(tiny_run[0]), images=2, pool=12)
    assert "the first images of textures:n=64,size=32" in page and not problems
    assert "pass --data" not in page


def test_tensorboard_is_used_when_importable_and_quietly_skipped_when_not(tmp_path, monkeypatch, recwarn):
    import types

    from dinolite.train.config import TrainConfig
    from dinolite.train.run import MetricsLog, RunDir

    calls = []

    class Writer:
        def __init__(self, log_dir):
            calls.append(("dir", log_dir))

        def add_scalar(self, key, value, step):
            calls.append((key, value, step))

        def close(self):
            calls.append("closed")

    assert TrainConfig().tensorboard  # on by default: used whenever it is installed
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    log = MetricsLog(RunDir(str(tmp_path / "a")), tensorboard=True)
    log.log({"step": 3, "loss": 2.5, "note": "text"})
    log.close()
    assert calls == [("dir", str(tmp_path / "a" / "tensorboard")), ("loss", 2.5, 3), "closed"]
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # not installed
    log = MetricsLog(RunDir(str(tmp_path / "b")), tensorboard=True)
    log.log({"step": 1, "loss": 1.0})
    assert log.writer is None and len(recwarn) == 0
    assert (tmp_path / "b" / "metrics.jsonl").read_text().strip() == '{"step": 1, "loss": 1.0}'


def test_wandb_logs_every_record_when_a_project_is_named(tmp_path, monkeypatch):
    import types

    from dinolite.train.run import MetricsLog, RunDir

    logged, inits = [], []

    class Run:
        def log(self, values, step):
            logged.append((values, step))

        def finish(self):
            logged.append("finished")

    def init(**kwargs):
        inits.append(kwargs)
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    log = MetricsLog(RunDir(str(tmp_path / "run")), wandb="photos")
    log.log({"step": 2, "knn_top1": 40.0})
    log.close()
    assert inits[0]["project"] == "photos" and inits[0]["name"] == "run"
    assert logged == [({"knn_top1": 40.0}, 2), "finished"]
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.warns(UserWarning, match="wandb is not installed"):
        assert MetricsLog(RunDir(str(tmp_path / "run2")), wandb="photos").wandb is None


def test_report_command_without_data_reads_data_txt(tiny_run, tmp_path):
    result = run_module("dinolite.report", tiny_run[0], "--output", tmp_path / "report.html", "--pool", "12")
    assert result.returncode == 0, result.stderr[-2000:]
    page = (tmp_path / "report.html").read_text()
    assert "the first images of textures:n=64,size=32" in page and "Nearest neighbours" in page
