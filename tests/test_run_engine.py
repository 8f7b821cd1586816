"""The run engine every training loop shares (dinolite.train.run): the bugs the three copies of the loop had.

Each test failed before the loops shared one engine (issue 20): metrics.jsonl was not cut back after a resume in
dinolite.train, distillation left the temp files of killed saves, distillation and scale/ DataLoader workers did not
get the one-thread init, and scale/plan.py planned selective checkpointing with a longer op list than the trainer ran.
"""
import json

import torch
from torch.utils.checkpoint import CheckpointPolicy

from dinolite.checkpoint import list_checkpoints
from dinolite.train import train
from dinolite.train.run import one_thread_worker
from tests.distributed_utils import run_distributed
from tests.test_distill import distill_cfg, teacher_file
from tests.test_train import DATA_SPEC, micro_config


def _steps(path) -> list[int]:
    with open(path) as f:
        return [record["step"] for record in map(json.loads, f) if "loss" in record]


def test_resume_cuts_metrics_back_to_the_checkpoint(tmp_path):
    # 6 steps with checkpoints at 4 and 6; the save at step 6 "never happened" (a kill after the step-6 log line).
    cfg = micro_config("train.epochs=2", "train.epoch_length=3", "train.checkpoint_every=2", "train.keep_last=2")
    train(cfg, DATA_SPEC, output_dir=str(tmp_path), knn_data=None)
    assert _steps(tmp_path / "metrics.jsonl") == [1, 2, 3, 4, 5, 6]
    steps_kept = dict(list_checkpoints(str(tmp_path)))
    assert sorted(steps_kept) == [4, 6]
    (tmp_path / "checkpoint_00000006.pth").unlink()
    resumed = train(cfg, DATA_SPEC, output_dir=str(tmp_path), knn_data=None)
    assert [r["step"] for r in resumed.history if "loss" in r] == [5, 6]
    assert _steps(tmp_path / "metrics.jsonl") == [1, 2, 3, 4, 5, 6]  # steps 5 and 6 once, not twice


def test_distillation_removes_the_temp_files_of_killed_saves(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    stale = out / ".tmp_checkpoint_00000002.pthx81k2"  # what atomic_save leaves when killed mid-write
    stale.write_bytes(b"half a checkpoint")
    keep = out / "notes.txt"
    keep.write_text("mine")
    train(distill_cfg(teacher_file(tmp_path), ["train.knn_every=0"]), "builtin:n=64,size=32", output_dir=str(out),
          knn_data=None)
    assert not stale.exists() and keep.read_text() == "mine"
    assert f"removed {stale}" in capsys.readouterr().out


class _RecordingLoader(torch.utils.data.DataLoader):
    """A DataLoader that records the worker_init_fn of every training loader a loop builds (one item = one collated
    step, batch_size=None; the kNN's feature loaders are not training loaders)."""
    built = []

    def __init__(self, *args, **kwargs):
        if "batch_size" in kwargs and kwargs["batch_size"] is None:
            _RecordingLoader.built.append(kwargs.get("worker_init_fn"))
        super().__init__(*args, **kwargs)


def test_dinov2_and_distillation_workers_get_one_thread(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.utils.data, "DataLoader", _RecordingLoader)
    _RecordingLoader.built = []
    train(micro_config("train.epochs=1", "train.epoch_length=1"), DATA_SPEC, knn_data=None)
    train(distill_cfg(teacher_file(tmp_path), ["train.epoch_length=1", "train.knn_every=0"]), "builtin:n=64,size=32",
          knn_data=None)
    assert _RecordingLoader.built == [one_thread_worker, one_thread_worker]


def _scale_worker_init(rank, world):
    from scale import train as scale_train
    from scale.config import load_scale_config

    torch.utils.data.DataLoader = _RecordingLoader
    _RecordingLoader.built = []
    cfg, dcfg = load_scale_config("tiny-cpu", [
        "model.depth=1", "model.embed_dim=32", "model.num_heads=2", "head.dino_out_dim=64", "head.ibot_out_dim=64",
        "head.hidden_dim=64", "head.bottleneck_dim=32", "train.epochs=1", "train.epoch_length=1",
        "train.batch_size=4", "train.num_workers=0", "train.progress=false", "dist.param_dtype=fp32"])
    scale_train.train(cfg, dcfg, "textures:n=16,size=32", log=lambda *a: None)
    return [fn is one_thread_worker for fn in _RecordingLoader.built]


def test_scale_workers_get_one_thread():
    assert run_distributed(_scale_worker_init, world_size=1) == [[True]]


def test_planner_and_trainer_share_one_selective_checkpointing_list():
    from scale import parallelize, plan

    assert plan.SELECTIVE_SAVE_OPS is parallelize.SELECTIVE_SAVE_OPS
    saved = {name for name in parallelize.SELECTIVE_SAVE_OPS
             if parallelize.keep_matmuls_and_attention(None, getattr(torch.ops.aten, name).default)
             == CheckpointPolicy.MUST_SAVE}
    assert saved == set(parallelize.SELECTIVE_SAVE_OPS) >= {"mm", "addmm", "bmm", "baddbmm"}
    for recomputed in (torch.ops.aten.gelu.default, torch.ops.aten.add.Tensor, torch.ops.aten.native_layer_norm.default):
        assert parallelize.keep_matmuls_and_attention(None, recomputed) == CheckpointPolicy.PREFER_RECOMPUTE

