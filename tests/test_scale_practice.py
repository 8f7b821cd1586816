"""scale/train.py's practice surfaces (issue 26): kNN and the collapse monitor (rank 0 logs; every rank runs the
sharded kNN forward), --print-config, one-line rejection of keys it does not honour, the SLURM launcher's flags."""
import json
import os
import subprocess
import sys

import yaml

from tests.cli_helpers import ROOT

TINY = ["model.depth=1", "model.embed_dim=48", "model.num_heads=3", "head.dino_out_dim=64", "head.ibot_out_dim=64",
        "head.hidden_dim=64", "head.bottleneck_dim=32", "train.batch_size=4", "train.epochs=1",
        "train.num_workers=0", "train.log_every=1", "dist.param_dtype=fp32", "train.progress=false",
        "train.knn_train_size=32", "train.knn_test_size=16"]


def _run(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_scale_run_logs_final_knn_and_monitors(scale_run):
    records = _records(scale_run)
    steps = [r["step"] for r in records if "knn_top1" in r]
    assert steps[0] == 0 and steps[-1] == 3  # at initialisation (tiny-cpu's knn_every) and at the end
    monitored = [r for r in records if "monitor/effective_rank" in r]
    assert [r["step"] for r in monitored] == [3] and monitored[0]["monitor/effective_rank"] > 1


def test_two_processes_run_knn_and_monitors_on_their_cadence(tmp_path):
    result = _run("-m", "torch.distributed.run", "--nproc_per_node", "2", "scale/train.py", "--config", "tiny-cpu",
                  "--data", "textures:n=64", "--output-dir", tmp_path / "run", *TINY, "train.epoch_length=4",
                  "train.knn_every=2", "train.monitor_every=2", timeout=400)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    records = _records(tmp_path / "run")
    assert [r["step"] for r in records if "knn_top1" in r] == [0, 2, 4]  # init, cadence, end: once each (rank 0)
    assert [r["step"] for r in records if "monitor/effective_rank" in r] == [2, 4]
    assert all(0 <= r["knn_top1"] <= 100 for r in records if "knn_top1" in r)


def test_print_config_needs_only_config_and_shows_dist():
    result = _run("scale/train.py", "--config", "tiny-cpu", "--print-config", "dist.compile=true", "model.depth=2")
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["dist"]["compile"] is True and printed["model"]["depth"] == 2


def test_keys_it_does_not_honour_are_one_line_errors(tmp_path):
    result = _run("scale/train.py", "--config", "tiny-cpu", "--data", "textures", "--output-dir", tmp_path / "run",
                  "train.minutes=5", f"teacher.checkpoint={ROOT / 'book/weights/textures_p8_teacher.pth'}")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "does not honour teacher.checkpoint=" in result.stderr and "train.minutes=5.0" in result.stderr
    assert not (tmp_path / "run").exists()


SLURM_FLAGS = ["--account", "vision", "--qos", "high", "--constraint", "h100|a100", "--exclusive",
               "--setup", "module load cuda/12.4", "--setup", "source ~/venv/bin/activate"]
TRAIN = ["--config", "tiny-cpu", "--data", "textures", "--output-dir", "runs/x"]


def test_slurm_flags_become_sbatch_lines():
    import inspect

    import pytest
    slurm = pytest.importorskip("submitit.slurm.slurm")
    from scale.launch_slurm import executor_parameters, parse_args

    params = executor_parameters(parse_args([*SLURM_FLAGS, "--", *TRAIN]))
    slurm_params = {k[len("slurm_"):]: v for k, v in params.items() if k.startswith("slurm_")}
    assert slurm_params == {"signal_delay_s": 120, "account": "vision", "qos": "high", "constraint": "h100|a100",
                            "exclusive": True, "setup": ["module load cuda/12.4", "source ~/venv/bin/activate"]}
    assert set(slurm_params) <= set(inspect.signature(slurm._make_sbatch_string).parameters)  # submitit's names
    sbatch = slurm._make_sbatch_string("python train.py", "logs", **slurm_params)
    for line in ("#SBATCH --account=vision", "#SBATCH --qos=high", "#SBATCH --constraint='h100|a100'",
                 "#SBATCH --exclusive", "module load cuda/12.4\nsource ~/venv/bin/activate"):
        assert line in sbatch, line
    assert "slurm_account" not in executor_parameters(parse_args(["--", *TRAIN]))  # absent unless asked


def test_launcher_help_shows_defaults_and_dry_run_shows_the_flags():
    result = _run("scale/launch_slurm.py", "--help")
    assert result.returncode == 0
    for text in ("--account", "--qos", "--constraint", "--exclusive", "--setup", "(default: 72:00:00)",
                 "(default: 8)", "(default: 10)"):
        assert text in " ".join(result.stdout.split()), text
    result = _run("scale/launch_slurm.py", *SLURM_FLAGS, "--dry-run", "--", *TRAIN)
    assert result.returncode == 0, result.stderr
    assert "'slurm_account': 'vision'" in result.stdout and "'slurm_exclusive': True" in result.stdout
