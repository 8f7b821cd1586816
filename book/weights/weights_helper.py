"""What both weight-making scripts share: training a run with `python -m dinolite.train`, sha256, the 5 MB size check,
the training time from metrics.jsonl, and writing one script's entries into reference.json (the other script's
entries are left as they are).

The scripts run as files (python book/weights/make_*.py), so this directory is on sys.path and they `import weights_helper`.
"""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
WEIGHTS = Path(__file__).resolve().parent
REFERENCE = WEIGHTS / "reference.json"
MAX_BYTES = 5 * 1024 * 1024  # the limit for committed weights


def train(train_args: list[str], skip: bool = False) -> None:
    """From the repository root, one thread: run `python -m dinolite.train *train_args` (resumes an existing run)."""
    os.chdir(ROOT)
    torch.set_num_threads(1)
    if skip:
        return
    command = [sys.executable, "-m", "dinolite.train", *train_args]
    print("training:", " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def command_line(train_args: list[str]) -> str:
    return "OMP_NUM_THREADS=1 python -m dinolite.train " + " ".join(train_args)


def sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checked(obj, path: Path) -> dict:
    """torch.save obj to path, refuse a file over MAX_BYTES; returns {"file", "bytes", "sha256"}."""
    torch.save(obj, path)
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise SystemExit(f"{path} is {size} bytes, over the 5 MB limit for committed weights")
    return {"file": path.name, "bytes": size, "sha256": sha256(path)}


def train_seconds(run_dir, batch_size: int = 32) -> float:
    """Time spent in training steps (not kNN evaluations), from the throughput logged in metrics.jsonl."""
    total, last = 0.0, 0
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if "images_per_s" in record:
                total += (record["step"] - last) * batch_size / record["images_per_s"]
                last = record["step"]
    return round(total, 1)


def update_reference(entries: dict) -> None:
    """Write these top-level entries into reference.json, keeping every other entry."""
    reference = json.loads(REFERENCE.read_text()) if REFERENCE.exists() else {}
    reference.update(entries)
    REFERENCE.write_text(json.dumps(reference, indent=1) + "\n")
