"""Tiny runs of a few steps (seconds each) that the tests of dinolite-embed, -eval and -report read back:
a dinolite run, a distillation run and a scale/ run, each made once per test session (fixtures in conftest.py).
"""
import os
import subprocess
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = "textures:n=64,size=32"
TINY = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "head.dino_out_dim=64", "head.ibot_out_dim=64",
        "head.hidden_dim=64", "head.bottleneck_dim=32", "crops.n_local=2", "train.batch_size=8", "train.epochs=1",
        "train.epoch_length=4", "train.knn_every=2", "train.knn_train_size=48", "train.knn_test_size=24",
        "train.checkpoint_every=2", "train.keep_last=3", "train.log_every=1", "train.monitor_every=2",
        "train.num_workers=0", "train.progress=false"]
DISTILL = [f"teacher.checkpoint={ROOT / 'book/weights/textures_p8_teacher.pth'}",
           "teacher.students=small:embed_dim=32,num_heads=1", "train.batch_size=8", "train.epochs=1",
           "train.epoch_length=3", "train.knn_every=3", "train.knn_train_size=48", "train.knn_test_size=24",
           "train.log_every=1", "train.num_workers=0", "train.progress=false"]
SCALE = ["model.depth=2", "model.embed_dim=48", "model.num_heads=3", "head.dino_out_dim=64", "head.ibot_out_dim=64",
         "head.hidden_dim=64", "head.bottleneck_dim=32", "train.epochs=1", "train.epoch_length=3", "train.batch_size=8",
         "train.num_workers=0", "train.log_every=1", "train.progress=false", "dist.param_dtype=fp32"]


def train_dinolite(output_dir: str, recipe: str = "tiny-cpu", overrides=TINY):
    from dinolite.train import apply_overrides, get_config, train

    with warnings.catch_warnings():  # "batch_size=8 images per rank is small": yes, on purpose
        warnings.simplefilter("ignore", UserWarning)
        return train(apply_overrides(get_config(recipe), list(overrides)), DATA, output_dir=output_dir)


def train_scale(output_dir: str) -> None:
    """scale/train.py in one process (its own process group, hence a subprocess)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "scale.train", "--config", "tiny-cpu", "--data", DATA,
                             "--output-dir", output_dir, *SCALE], capture_output=True, text=True, timeout=600,
                            cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
