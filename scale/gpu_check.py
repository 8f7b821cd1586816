"""The first-GPU check (issue 28): every GPU path of dinolite and scale/ once, in under 10 minutes on one GPU, then
one table. Run it through scale/smoke_gpu.sh --check (or python -m scale.gpu_check).

    1. loop      python -m dinolite.train, vits16-imagenette-1gpu for 60 steps: multi-crop packing, bf16, Sinkhorn-
                 Knopp, drop path, collapse monitor, checkpoints, resume, export, kNN (synthetic 224 px data)
    2. scale     scale/train.py in one NCCL process with selective activation checkpointing: 20 steps stopped at 10
                 and resumed from the DCP checkpoint, then python -m scale.export; the export loads on the CPU
    3. compile   the same scale/ run with dist.compile=true (10 steps)
    4. vitg      bash scale/smoke_gpu.sh: ViT-g/14 on FSDP2, bf16, full activation checkpointing
    5. chapters  chapters 7, 9, 10 under nbval: their GPU branches (FAST = not torch.cuda.is_available())

--cpu-dry-run runs the same commands as far as a CPU allows (tiny models, a few steps, gloo, no compile, no
nbval), to check this script and the commands' plumbing without a GPU. Exit code 1 when a check fails.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

PY = sys.executable
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def checks(work: str, cpu: bool) -> list[tuple[str, list[list[str]], int]]:
    """(name, commands run in order, time limit in seconds) for a GPU, or their CPU stand-ins."""
    loop_dir, scale_dir, compile_dir = (os.path.join(work, d) for d in ("loop", "scale", "compile"))
    if cpu:
        loop = [PY, "-m", "dinolite.train", "--config", "tiny-cpu", "--data", "builtin:n=64,size=32",
                "--output-dir", loop_dir, "train.device=cpu", "train.epochs=1", "train.epoch_length=4",
                "train.batch_size=8", "train.checkpoint_every=2", "train.monitor_every=2", "train.knn_every=4",
                "train.num_workers=0", "train.progress=false", "loss.centering=sinkhorn_knopp"]
        scale = [PY, "scale/train.py", "--config", "tiny-cpu", "--data", "builtin:n=64,size=32", "--output-dir",
                 scale_dir, "train.device=cpu", "train.epochs=1", "train.epoch_length=4", "train.batch_size=8",
                 "train.checkpoint_every=2", "train.num_workers=0", "train.progress=false",
                 "dist.activation_checkpointing=selective", "dist.param_dtype=fp32", "loss.centering=sinkhorn_knopp"]
        stop = "2"
        compile_cmds = []
        vitg = [["bash", "scale/smoke_gpu.sh", "--tiny"]]
        chapters = []
    else:
        loop = [PY, "-m", "dinolite.train", "--config", "vits16-imagenette-1gpu", "--data",
                "builtin:n=4096,size=224", "--output-dir", loop_dir, "train.device=cuda", "train.precision=bf16",
                "train.epochs=1", "train.epoch_length=60", "train.checkpoint_every=30", "train.monitor_every=20",
                "train.knn_every=60", "train.knn_train_size=1000", "train.knn_test_size=500", "train.progress=false",
                "loss.centering=sinkhorn_knopp", "model.drop_path_rate=0.1"]
        scale = [PY, "scale/train.py", "--config", "vits16-imagenette-1gpu", "--data", "builtin:n=4096,size=224",
                 "--output-dir", scale_dir, "train.device=cuda", "train.epochs=1", "train.epoch_length=20",
                 "train.checkpoint_every=10", "train.progress=false", "dist.activation_checkpointing=selective",
                 "loss.centering=sinkhorn_knopp"]
        stop = "10"
        compile_cmds = [[PY, "scale/train.py", "--config", "vits16-imagenette-1gpu", "--data",
                         "builtin:n=2048,size=224", "--output-dir", compile_dir, "train.device=cuda", "train.epochs=1",
                         "train.epoch_length=10", "train.progress=false", "dist.compile=true"]]
        vitg = [["bash", "scale/smoke_gpu.sh"]]
        chapters = [[PY, "-m", "pytest", "--nbval-lax", "--nbval-current-env", "-p", "no:cacheprovider", "-q",
                     "book/07_training.ipynb", "book/09_gram_anchoring.ipynb", "book/10_distillation.ipynb"]]
    def export_on_cpu(path):  # the export's tensors are CPU tensors (a plain torch.load works without CUDA)
        return [PY, "-c", "import sys, torch; s = torch.load(sys.argv[1]); assert all(t.device.type == 'cpu' for t in "
                "s.values()), 'the export holds GPU tensors'; print(f'{len(s)} CPU tensors in', sys.argv[1])", path]

    loop_cmds = [loop, export_on_cpu(os.path.join(loop_dir, "teacher_backbone_official.pth"))]
    # scale/: stopped at a checkpoint, resumed from the DCP checkpoint, exported (at the end and by scale.export).
    scale_cmds = [scale + ["--stop-at-step", stop], scale, export_on_cpu(os.path.join(scale_dir,
                  "teacher_backbone_official.pth")), [PY, "-m", "scale.export", scale_dir]]
    return [("loop", loop_cmds, 240), ("scale", scale_cmds, 180), ("compile", compile_cmds, 180),
            ("vitg", vitg, 300), ("chapters", chapters, 540)]


def run_check(commands: list[list[str]], limit: int, log) -> tuple[str, float, str]:
    """Run the commands in order; (status, seconds, last line of output)."""
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for command in commands:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        left = max(1, limit - (time.perf_counter() - start))
        try:
            done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=left)
        except subprocess.TimeoutExpired:
            return "TIMEOUT", time.perf_counter() - start, f"over {limit} s"
        log.write(done.stdout + done.stderr)
        lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        if done.returncode != 0:
            return "FAIL", time.perf_counter() - start, lines[-1][:90] if lines else f"exit {done.returncode}"
    last = lines[-1][:90] if commands and lines else ""
    return ("ok" if commands else "skipped"), time.perf_counter() - start, last


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scale.gpu_check", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-dry-run", action="store_true", help="tiny CPU stand-ins of every check")
    parser.add_argument("--only", default="", help="comma-separated check names (default: all)")
    parser.add_argument("--keep", default=None, help="directory for the runs and check.log (default: a temporary one)")
    args = parser.parse_args(argv)
    if not args.cpu_dry_run and not torch.cuda.is_available():
        print("error: no usable GPU (torch.cuda.is_available() is False); run with --cpu-dry-run to check the "
              "script on a CPU", file=sys.stderr)
        return 2
    work = args.keep or tempfile.mkdtemp(prefix="gpu_check_")
    os.makedirs(work, exist_ok=True)
    wanted = {name for name in args.only.split(",") if name}
    device = "CPU dry run" if args.cpu_dry_run else torch.cuda.get_device_name()
    rows = []
    with open(os.path.join(work, "check.log"), "w") as log:
        for name, commands, limit in checks(work, args.cpu_dry_run):
            if wanted and name not in wanted:
                continue
            print(f"{name} ...", flush=True)
            rows.append((name, *run_check(commands, limit, log)))
    print(f"\nGPU check on {device} (torch {torch.__version__}, CUDA {torch.version.cuda}); logs in {work}/check.log")
    print(f"{'check':9s} {'status':8s} {'seconds':>8s}  last line")
    for name, status, seconds, last in rows:
        print(f"{name:9s} {status:8s} {seconds:8.0f}  {last}")
    if args.keep is None and all(status in ("ok", "skipped") for _, status, _, _ in rows):
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(status in ("ok", "skipped") for _, status, _, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
