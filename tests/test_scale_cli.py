"""scale/train.py and scale/smoke_gpu.sh from the command line (one process, gloo): outputs, one-line errors, the
non-finite stop, and the Python part of the GPU smoke test on CPU."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["model.depth=1", "model.embed_dim=48", "model.num_heads=3", "head.dino_out_dim=64", "head.ibot_out_dim=64",
        "head.hidden_dim=64", "head.bottleneck_dim=32", "train.batch_size=4", "train.epochs=1",
        "train.epoch_length=6", "train.num_workers=0", "train.log_every=1", "dist.param_dtype=fp32"]


def run(args, **kwargs):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                          **kwargs)


def test_dinolite_never_imports_scale():
    import pathlib
    import re

    importing = [str(path.relative_to(ROOT)) for path in pathlib.Path(ROOT, "dinolite").rglob("*.py")
                 if re.search(r"^\s*(from|import)\s+scale\b", path.read_text(), re.MULTILINE)]
    assert importing == []


def test_bad_input_is_a_one_line_error_with_exit_code_2(tmp_path):
    out = str(tmp_path / "run")
    cases = [(["--config", "tiny-cpu", "--data", "textures:n=64", "--output-dir", out, "dist.compile=maybe"],
              "config key 'dist.compile' expects bool"),
             (["--config", "tiny-cpu", "--data", "textures:n=64", "--output-dir", out, "dist.sharding=full"],
              "unknown config key 'dist.sharding'"),
             (["--config", "tiny-cpu", "--data", "textures:n=3", "--output-dir", out, *TINY],
              "the dataset has 3 images, fewer than one global batch")]
    for args, message in cases:
        result = run(["scale/train.py", *args])
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith(f"error: {message}") and result.stderr.count("\n") == 1, result.stderr


def test_non_finite_losses_stop_the_run_with_one_line(tmp_path):
    # An absurd learning rate: after the first update the activations overflow and every later loss is not finite.
    result = run(["scale/train.py", "--config", "tiny-cpu", "--data", "textures:n=64", "--output-dir",
                  str(tmp_path), *TINY, "optim.base_lr=1e30", "optim.warmup_epochs=0", "optim.clip_grad=0",
                  "train.progress=false"])
    assert result.returncode == 1
    assert result.stderr.startswith("error: loss or gradient not finite for 3 steps in a row")
    assert result.stderr.count("\n") == 1, result.stderr
    with open(tmp_path / "metrics.jsonl") as f:
        losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
    assert len(losses) < 6 and all(loss is None for loss in losses[-3:])  # strict JSON: null, not NaN


def test_smoke_script_parses_and_its_python_part_runs_on_cpu(tmp_path):
    assert subprocess.run(["bash", "-n", "scale/smoke_gpu.sh"], cwd=ROOT).returncode == 0
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"total_bytes": 10**9}))
    result = run(["-m", "scale.smoke", "--tiny", "--steps", "2", "--warmup", "1", "--plan", str(plan)])
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["images_per_s"] > 0 and summary["tflops_per_s"] > 0 and summary["planner_total_bytes"] == 10**9


def _torchrun(output_dir, **kwargs):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "scale/train.py",
               "--config", "tiny-cpu", "--data", "textures:n=64", "--output-dir", str(output_dir), *TINY,
               "train.epoch_length=8", "train.checkpoint_every=2", "train.progress=false"]
    return subprocess.Popen(command, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def _losses(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"], r["grad_norm"]) for r in map(json.loads, f) if "loss" in r]


def test_torchrun_killed_mid_run_resumes_exactly(tmp_path):
    import signal
    import time

    reference = _torchrun(tmp_path / "reference")
    killed = _torchrun(tmp_path / "killed", start_new_session=True)
    deadline = time.monotonic() + 240
    while not (tmp_path / "killed" / "dcp_00000002").exists():  # the first checkpoint is complete (renamed)
        assert killed.poll() is None and time.monotonic() < deadline, killed.communicate()[0][-2000:]
        time.sleep(0.05)
    os.killpg(killed.pid, signal.SIGKILL)  # torchrun and both workers, wherever they are (maybe mid-save)
    killed.wait()
    assert reference.wait(timeout=240) == 0
    resumed = _torchrun(tmp_path / "killed")
    output = resumed.communicate(timeout=240)[0]
    assert resumed.returncode == 0 and "resuming from step" in output, output[-2000:]
    assert _losses(tmp_path / "killed") == _losses(tmp_path / "reference")  # steps 1..8, bitwise
    assert [s for s, _, _ in _losses(tmp_path / "reference")] == list(range(1, 9))


def test_resuming_with_another_config_or_global_batch_is_a_one_line_error(tmp_path):
    first = run(["scale/train.py", "--config", "tiny-cpu", "--data", "textures:n=64", "--output-dir", str(tmp_path),
                 *TINY, "train.progress=false", "--stop-at-step", "1"])
    assert first.returncode == 0, first.stderr
    for change, message in ((["model.depth=2"], "holds a run with a different config (model.depth: saved 1 vs now 2)"),
                            (["train.batch_size=2"], "was trained with a global batch of 4 images, this run has 2")):
        result = run(["scale/train.py", "--config", "tiny-cpu", "--data", "textures:n=64", "--output-dir",
                      str(tmp_path), *TINY, *change])
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert message in result.stderr
