"""Helpers of the command-line tests: a labelled image folder, one-line errors, a subprocess with this checkout."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"blue": (30, 60, 220), "green": (40, 200, 60), "red": (220, 40, 40)}


def colour_folder(root: Path, classes, per_class: int, seed: int = 0) -> Path:
    """root/<class>/<i>.png: 40x40 images of one colour per class with +-6 levels of noise (trivially separable)."""
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.array(COLOURS[name]) + rng.integers(-6, 7, size=(40, 40, 3))
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / name / f"{i}.png")
    return root


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    return err[-1]


def run_module(module: str, *args, cwd=None) -> subprocess.CompletedProcess:
    """python -m module args, importing this checkout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=cwd or ROOT, env=env)
