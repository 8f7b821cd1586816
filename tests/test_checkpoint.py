"""Atomic checkpoints: a crash while writing leaves the previous checkpoint intact; keep-last-K;
the temporary file of a killed save is removed at the next start."""
import os
import signal
import subprocess
import sys

import pytest
import torch

from dinolite import checkpoint as ckpt


def test_save_load_round_trip(tmp_path):
    state = {"step": 5, "w": torch.arange(4.0), "nested": {"a": [1, 2]}}
    path = ckpt.save_checkpoint(state, str(tmp_path), 5)
    assert os.path.basename(path) == "checkpoint_00000005.pth"
    loaded = ckpt.load_checkpoint(path)
    assert loaded["step"] == 5 and torch.equal(loaded["w"], state["w"]) and loaded["nested"] == {"a": [1, 2]}


def test_keep_last_k(tmp_path):
    for step in (10, 20, 30, 40, 50):
        ckpt.save_checkpoint({"step": step}, str(tmp_path), step, keep_last=2)
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path))] == [40, 50]
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(str(tmp_path)))["step"] == 50
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_00000040.pth", "checkpoint_00000050.pth"]


def test_crash_mid_write_keeps_previous(tmp_path, monkeypatch):
    ckpt.save_checkpoint({"step": 1, "w": torch.ones(3)}, str(tmp_path), 1)
    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b"partial garbage")  # some bytes reach the disk, then the process dies
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint({"step": 2, "w": torch.zeros(3)}, str(tmp_path), 2)
    monkeypatch.setattr(torch, "save", real_save)
    # No half-written checkpoint_2, no temporary left over, and the previous one loads.
    assert os.listdir(tmp_path) == ["checkpoint_00000001.pth"]
    latest = ckpt.load_checkpoint(ckpt.latest_checkpoint(str(tmp_path)))
    assert latest["step"] == 1 and torch.equal(latest["w"], torch.ones(3))


def test_crash_while_overwriting_same_step(tmp_path, monkeypatch):
    path = ckpt.save_checkpoint({"step": 3, "v": 1}, str(tmp_path), 3)

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b"xx")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError):
        ckpt.atomic_save({"step": 3, "v": 2}, path)
    monkeypatch.undo()
    assert ckpt.load_checkpoint(path)["v"] == 1


def test_listing_ignores_other_files(tmp_path):
    (tmp_path / ".tmp_checkpoint_00000009.pthabc").write_bytes(b"x")
    (tmp_path / "metrics.jsonl").write_text("{}")
    (tmp_path / "checkpoint_12.pth").write_bytes(b"x")
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path))] == [12]
    assert ckpt.latest_checkpoint(str(tmp_path / "missing")) is None


def test_keep_last_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="keep_last"):
        ckpt.save_checkpoint({}, str(tmp_path), 1, keep_last=0)


_KILLED_MID_SAVE = """
import os, signal, sys
import torch
from dinolite import checkpoint as ckpt

def dying_save(obj, f, *args, **kwargs):
    f.write(b"half a checkpoint")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)  # no except/finally block runs after this

torch.save = dying_save
ckpt.save_checkpoint({"step": 2}, sys.argv[1], 2)
"""


def test_stale_temp_file_of_a_killed_save_is_removed_at_start(tmp_path):
    ckpt.save_checkpoint({"step": 1, "w": torch.ones(3)}, str(tmp_path), 1)
    result = subprocess.run([sys.executable, "-c", _KILLED_MID_SAVE, str(tmp_path)], capture_output=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()[-2000:]
    leftovers = [name for name in os.listdir(tmp_path) if name.startswith(".tmp_checkpoint_00000002.pth")]
    assert len(leftovers) == 1  # SIGKILL leaves the temporary file behind
    (tmp_path / ".tmp_notes.txt").write_text("not ours")
    (tmp_path / "checkpoint_00000003.pth.bak").write_text("not ours either")

    removed = ckpt.remove_stale_temp_files(str(tmp_path))
    assert removed == [str(tmp_path / leftovers[0])]
    assert sorted(os.listdir(tmp_path)) == [".tmp_notes.txt", "checkpoint_00000001.pth", "checkpoint_00000003.pth.bak"]
    latest = ckpt.load_checkpoint(ckpt.latest_checkpoint(str(tmp_path)))
    assert latest["step"] == 1 and torch.equal(latest["w"], torch.ones(3))
    assert ckpt.remove_stale_temp_files(str(tmp_path / "missing")) == []
