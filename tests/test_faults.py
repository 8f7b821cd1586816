"""Faults a long run meets (issue 27): a full disk, a non-finite loss, preemption (SIGTERM), image files that go bad
mid-run, checkpoint file modes. Each ends in one line that says what is intact and the fix; nothing saved is lost."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

import dinolite.checkpoint as ckpt
from dinolite.data import BadImagesError, ImageFolderDataset
from dinolite.train import train
from dinolite.train.__main__ import main
from dinolite.train.meta_arch import DINOv2MetaArch
from dinolite.train.faults import NonFiniteLossError, one_line
from dinolite.train.run import strict_json
from tests.distributed_utils import run_distributed
from tests.test_distill import distill_cfg, teacher_file
from tests.test_train import DATA_SPEC, MICRO, micro_config

ROOT = Path(__file__).resolve().parents[1]


def _strict_records(path) -> list[dict]:
    """metrics.jsonl parsed as strict JSON: NaN / Infinity are rejected."""
    def reject(name):
        raise ValueError(f"{name} is not JSON")
    return [json.loads(line, parse_constant=reject) for line in Path(path).read_text().splitlines()]


# ----------------------------------------------------------------------------- file modes


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_checkpoints_and_exports_get_the_umask_mode(tmp_path, umask):
    previous = os.umask(umask)
    try:
        path = ckpt.save_checkpoint({"w": torch.ones(3)}, str(tmp_path), 1)
        export = tmp_path / "export.pth"
        ckpt.atomic_save({"w": torch.ones(3)}, str(export))
    finally:
        os.umask(previous)
    expected = 0o666 & ~umask  # what open() / torch.save(obj, path) give; mkstemp alone gives 0o600
    assert os.stat(path).st_mode & 0o777 == expected
    assert os.stat(export).st_mode & 0o777 == expected


def test_a_training_run_writes_group_readable_files(tmp_path):
    previous = os.umask(0o022)
    try:
        train(micro_config("train.epochs=1", "train.epoch_length=2"), DATA_SPEC, output_dir=str(tmp_path),
              knn_data=None)
    finally:
        os.umask(previous)
    for name in ("checkpoint_00000002.pth", "teacher_backbone_official.pth"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o644, name


# ----------------------------------------------------------------------------- full disk


def _full_disk_after(n_bytes):
    """A torch.save that writes n_bytes, then fails as a full disk does (write(2) -> ENOSPC)."""
    def save(obj, f):
        f.write(b"\0" * n_bytes)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return save


def test_full_disk_names_the_file_the_space_and_the_intact_checkpoint(tmp_path, monkeypatch):
    state = {"w": torch.arange(1000.0)}
    first = ckpt.save_checkpoint(state, str(tmp_path), 1)
    intact = Path(first).read_bytes()
    monkeypatch.setattr(ckpt.torch, "save", _full_disk_after(100))
    with pytest.raises(ckpt.DiskFullError) as info:
        ckpt.save_checkpoint(state, str(tmp_path), 2, keep_last=1)
    message = str(info.value)
    assert "\n" not in message and info.value.errno == errno.ENOSPC
    assert str(ckpt.checkpoint_path(str(tmp_path), 2)) in message  # the file being written
    size_mb = f"{os.path.getsize(first) / 1e6:.1f} MB"
    assert f"it needs about {size_mb}" in message and " free on " in message
    assert f"the last intact checkpoint is {first}" in message and "train.keep_last" in message
    # nothing intact removed (keep_last=1 did not delete step 1), no temporary file left
    assert os.listdir(tmp_path) == [os.path.basename(first)]
    assert Path(first).read_bytes() == intact


def test_full_disk_inside_torch_save_is_recognised():
    # torch.save reports a failed write as "[enforce fail at inline_container.cc] . unexpected pos ..."
    assert ckpt.is_disk_full(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 718912 vs 718800"))
    wrapped = RuntimeError("rank 1 failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert ckpt.is_disk_full(wrapped)
    assert not ckpt.is_disk_full(RuntimeError("CUDA out of memory"))
    assert not ckpt.is_disk_full(OSError(errno.EACCES, "Permission denied"))


def test_cli_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_save = torch.save
    calls = []

    def save(obj, f):
        calls.append(1)
        return real_save(obj, f) if len(calls) == 1 else _full_disk_after(10)(obj, f)

    monkeypatch.setattr(ckpt.torch, "save", save)
    code = main(["--config", "tiny-cpu", "--data", DATA_SPEC, "--output-dir", str(out), *MICRO,
                 "train.checkpoint_every=1", "train.keep_last=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and err[0].startswith("error: disk full while writing ")
    assert "checkpoint_00000002.pth" in err[0] and "checkpoint_00000001.pth (nothing was removed)" in err[0]
    assert sorted(os.listdir(out)) == ["checkpoint_00000001.pth", "config.yaml", "data.txt", "metrics.jsonl"]
    ckpt.load_checkpoint(str(out / "checkpoint_00000001.pth"))  # intact


def test_low_free_space_is_warned_before_the_first_write(tmp_path, monkeypatch):
    usage = ckpt.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: usage._replace(free=30_000_000))
    with pytest.warns(UserWarning, match=r"only 30.0 MB free .* a checkpoint takes about 10.0 MB .*keep_last=3"):
        ckpt.warn_if_low_space(str(tmp_path), 10_000_000, keep_last=3)  # 4 x 10 MB needed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ckpt.warn_if_low_space(str(tmp_path), 10_000_000, keep_last=1) is None


# ----------------------------------------------------------------------------- non-finite loss


def _nan_loss_at(monkeypatch, bad_calls):
    """Make the loss of the forward_losses calls numbered in bad_calls (0-based) NaN."""
    real = DINOv2MetaArch.forward_losses
    calls = []

    def forward_losses(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if len(calls) in bad_calls:
            out["loss"] = out["loss"] * float("nan")
        calls.append(1)
        return out

    monkeypatch.setattr(DINOv2MetaArch, "forward_losses", forward_losses)


def test_a_non_finite_step_is_skipped_and_logged_as_null(tmp_path, monkeypatch):
    cfg = micro_config("train.epochs=1", "train.epoch_length=3", "train.log_every=3")
    reference = train(cfg, DATA_SPEC, knn_data=None)
    _nan_loss_at(monkeypatch, {1})  # step 2
    arch = train(cfg, DATA_SPEC, output_dir=str(tmp_path), knn_data=None)
    assert arch.completed_steps == 3
    records = _strict_records(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [2, 3]  # the skipped step is logged although off cadence
    assert records[0]["loss"] is None and records[0]["grad_norm"] is None
    # the skipped step changed nothing: the run differs from the reference (its step 2 was skipped) ...
    assert not torch.equal(arch.teacher.state_dict()["backbone.cls_token"], reference.teacher.state_dict()["backbone.cls_token"])
    assert all(torch.isfinite(v).all() for v in arch.teacher.state_dict().values() if v.is_floating_point())


def test_skipped_step_leaves_weights_and_optimiser_untouched(monkeypatch):
    from dinolite.train.loop import train_step
    from dinolite.train.optim import build_optimizer, schedule_values
    from tests.test_train import micro_batch

    cfg = micro_config()
    torch.manual_seed(0)
    arch = DINOv2MetaArch(cfg)
    optimizer = build_optimizer(arch.student, cfg)
    before = {k: v.clone() for k, v in {**arch.student.state_dict(), **arch.teacher.state_dict()}.items()}
    _nan_loss_at(monkeypatch, {0})
    values = schedule_values(cfg, 0, 6, 3, 8)
    out = train_step(arch, optimizer, micro_batch(cfg), 0, values)
    assert out["finite"] is False
    after = {**arch.student.state_dict(), **arch.teacher.state_dict()}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not optimizer.state  # AdamW never stepped


def test_cli_non_finite_loss_stops_after_max_nonfinite_in_one_line(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _nan_loss_at(monkeypatch, {2, 3, 4, 5})  # steps 3, 4, ...
    code = main(["--config", "tiny-cpu", "--data", DATA_SPEC, "--output-dir", str(out), *MICRO,
                 "train.checkpoint_every=1", "train.max_nonfinite=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("error: loss or gradient not finite for 2 steps in a row (last: step 4")
    # step 3 was skipped (weights of step 2, finite) and checkpointed; step 4 stopped the run before its checkpoint
    assert f"the last good checkpoint is {out / 'checkpoint_00000003.pth'}" in err[0]
    assert "optim.base_lr" in err[0]
    records = _strict_records(out / "metrics.jsonl")
    assert [r["loss"] is None for r in records if "loss" in r] == [False, False, True, True]
    assert "train.max_nonfinite" in open(ROOT / "README.md").read()


def test_distillation_skips_non_finite_steps_then_stops(tmp_path, monkeypatch):
    from dinolite.train.distill import DistillArch

    real = DistillArch.forward_losses

    def forward_losses(self, *args, **kwargs):
        outs = real(self, *args, **kwargs)
        outs["student"]["loss"] = outs["student"]["loss"] * float("nan")
        return outs

    monkeypatch.setattr(DistillArch, "forward_losses", forward_losses)
    cfg = distill_cfg(teacher_file(tmp_path), ["train.log_every=1", "train.max_nonfinite=2"])
    with pytest.raises(NonFiniteLossError, match="2 steps in a row .*no checkpoint was written yet"):
        train(cfg, DATA_SPEC, output_dir=str(tmp_path / "run"), knn_data=None)
    records = _strict_records(tmp_path / "run" / "metrics.jsonl")
    assert [r["loss"] for r in records] == [None, None]


def test_strict_json_writes_null_for_non_finite_values():
    line = strict_json({"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "lr": 0.5})
    assert json.loads(line) == {"step": 1, "loss": None, "grad_norm": None, "lr": 0.5}


# ----------------------------------------------------------------------------- preemption (SIGTERM)


def _cli(out, *extra):
    return [sys.executable, "-m", "dinolite.train", "--config", "tiny-cpu", "--data", DATA_SPEC,
            "--output-dir", str(out), *MICRO, "train.epochs=1", "train.epoch_length=40", "train.checkpoint_every=100",
            "train.knn_train_size=24", "train.knn_test_size=12", *extra]


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _without_timing(path):
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in _strict_records(path)]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_sigterm_checkpoints_and_the_resumed_run_equals_an_uninterrupted_one(tmp_path, num_workers):
    extra = [f"train.num_workers={num_workers}"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert subprocess.run(_cli(whole, *extra), capture_output=True, text=True, env=_env(), timeout=600).returncode == 0

    process = subprocess.Popen(_cli(cut, *extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=_env())
    metrics, deadline = cut / "metrics.jsonl", time.time() + 300
    while not (metrics.exists() and metrics.read_text().strip()) and time.time() < deadline:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGTERM)  # after the first logged step
    _, err = process.communicate(timeout=300)
    assert process.returncode == 143, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("stopped by SIGTERM after step ") and "run the same command again to resume" in last
    stopped = int(last.split("after step ")[1].split(":")[0])
    assert 1 <= stopped < 40
    assert ckpt.list_checkpoints(str(cut))[-1][0] == stopped
    assert not (cut / "teacher_backbone_official.pth").exists()

    resumed = subprocess.run(_cli(cut, *extra), capture_output=True, text=True, env=_env(), timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from step {stopped}" in resumed.stdout
    assert (cut / "teacher_backbone_official.pth").read_bytes() == (whole / "teacher_backbone_official.pth").read_bytes()
    assert _without_timing(cut / "metrics.jsonl") == _without_timing(whole / "metrics.jsonl")


# ----------------------------------------------------------------------------- image files that go bad mid-run


def _image_folder(root, n=8):
    root.mkdir()
    for i in range(n):
        Image.new("RGB", (16, 16), (30 * i, 0, 0)).save(root / f"{i:02d}.jpg", quality=95)
    return root


def test_images_deleted_or_truncated_after_indexing_are_skipped_deterministically(tmp_path):
    root = _image_folder(tmp_path / "images")
    dataset = ImageFolderDataset(root)
    expected = [dataset[i][0].getpixel((8, 8)) for i in range(8)]
    (root / "02.jpg").unlink()
    data = (root / "05.jpg").read_bytes()
    (root / "05.jpg").write_bytes(data[: len(data) // 2])
    fresh = ImageFolderDataset.__new__(ImageFolderDataset)
    fresh.__dict__.update(dataset.__dict__, _failed=set())
    for copy in (dataset, fresh):  # two processes meeting the bad files: the same replacement
        with pytest.warns(UserWarning, match=r"cannot read .*02.jpg .*bad image 1\b"):
            assert copy[2][0].getpixel((8, 8)) == expected[3]  # the next index
        with pytest.warns(UserWarning, match=r"cannot read .*05.jpg .*bad image 2\b"):
            assert copy[5][0].getpixel((8, 8)) == expected[6]
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a file already known bad: no second warning
            assert copy[2][0].getpixel((8, 8)) == expected[3]


def test_more_bad_images_than_allowed_is_one_error_naming_them(tmp_path):
    root = _image_folder(tmp_path / "images")
    dataset = ImageFolderDataset(root)
    dataset.max_bad_images = 1
    (root / "01.jpg").unlink()
    (root / "04.jpg").write_bytes(b"not a jpeg any more")
    with pytest.warns(UserWarning, match="bad image 1 of at most 1"):
        dataset[1]
    with pytest.raises(BadImagesError) as info:
        dataset[4]
    message = str(info.value)
    assert "\n" not in message and "2 image files" in message and "more than the 1 allowed" in message
    assert "01.jpg" in message and "04.jpg" in message and "train.max_bad_images_fraction" in message


def test_cli_training_skips_a_bad_image_and_stops_at_too_many(tmp_path):
    # A list file indexes paths without decoding them: files that are corrupt when the run reads them are files that
    # went bad after indexing (deleting one after indexing is covered above, on the dataset itself).
    root = _image_folder(tmp_path / "images", n=16)
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{p}\n" for p in sorted(root.iterdir())))

    def run(out, *extra):
        cmd = [sys.executable, "-m", "dinolite.train", "--config", "tiny-cpu", "--data", f"list:{listing}",
               "--output-dir", str(tmp_path / out), *MICRO, "train.epochs=1", "train.epoch_length=4",
               "train.num_workers=1", *extra]
        return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)

    (root / "03.jpg").write_bytes(b"truncated")
    ok = run("ok", "train.max_bad_images_fraction=0.1")  # 16 images: 1 may go bad
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "03.jpg" in ok.stderr and "bad image 1 of at most 1" in ok.stderr
    for name in ("05.jpg", "07.jpg", "11.jpg"):
        (root / name).write_bytes((root / name).read_bytes()[:100])
    bad = run("bad")  # 0.1% of 16: at least 1 may go bad; 4 steps of 8 images meet at least 2 of the 4
    assert bad.returncode == 1
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "could not be read during the run, more than the 1 allowed" in last
    named = [n for n in ("03.jpg", "05.jpg", "07.jpg", "11.jpg") if n in last]
    assert len(named) == 2 and "Traceback" not in bad.stderr  # the second bad file stops the run, both named


def test_one_line_unwraps_an_error_from_a_data_loader_worker():
    wrapped = BadImagesError("Caught BadImagesError in DataLoader worker process 0.\nOriginal Traceback (most "
                             "recent call last):\n  File \"x.py\", line 1\ndinolite.data.datasets.BadImagesError: "
                             "3 image files of /d could not be read")
    assert one_line(wrapped) == "3 image files of /d could not be read"
    assert one_line(ValueError("plain")) == "plain"


# ----------------------------------------------------------------------------- scale/train.py


def _scale_faults(rank, world):
    """On 2 gloo processes: a NaN run, a SIGTERM on rank 1 only, its resume against an uninterrupted run, a full disk."""
    import tempfile

    from scale import checkpoint as scale_ckpt
    from scale import train as scale_train
    from scale.checkpoint import full_state_dict
    from tests.test_scale_train import DATA, scale_cfg

    torch.set_num_threads(1)
    results = {}
    tmp = tempfile.mkdtemp() if rank == 0 else None
    box = [tmp]
    torch.distributed.broadcast_object_list(box)
    tmp = box[0]
    cfg, dcfg = scale_cfg(world, extra=["train.max_nonfinite=2", "train.checkpoint_every=1"])
    real = DINOv2MetaArch.forward_losses
    calls = []

    def patched(mode):
        def forward_losses(self, *args, **kwargs):
            out = real(self, *args, **kwargs)
            calls.append(1)
            if mode == "nan" and len(calls) >= 2:
                out["loss"] = out["loss"] * float("nan")
            if mode == "sigterm" and len(calls) == 2 and rank == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            return out
        return forward_losses

    def run(mode, output_dir):
        calls.clear()
        DINOv2MetaArch.forward_losses = patched(mode)
        try:
            return scale_train.train(cfg, dcfg, DATA, output_dir, log=lambda *a: None)
        finally:
            DINOv2MetaArch.forward_losses = real

    try:
        run("nan", os.path.join(tmp, "nan"))
    except NonFiniteLossError as e:
        results["nan"] = str(e)
    results["nan_records"] = _strict_records(os.path.join(tmp, "nan", "metrics.jsonl")) if rank == 0 else None
    whole = run(None, os.path.join(tmp, "whole"))
    results["whole"] = full_state_dict(whole.teacher)
    cut = run("sigterm", os.path.join(tmp, "cut"))
    results["stopped"] = (cut.completed_steps, cut.stopped_by)
    resumed = run(None, os.path.join(tmp, "cut"))
    results["resumed"] = full_state_dict(resumed.teacher)
    real_save = scale_ckpt.dcp.save

    def full_disk(state, checkpoint_id):
        os.makedirs(checkpoint_id, exist_ok=True)
        Path(checkpoint_id, f"part{rank}").write_bytes(b"\0" * 10)
        raise RuntimeError(f"rank {rank}: [Errno 28] No space left on device")

    scale_ckpt.dcp.save = full_disk
    try:
        run(None, os.path.join(tmp, "whole2"))
    except ckpt.DiskFullError as e:
        results["disk"] = str(e)
    finally:
        scale_ckpt.dcp.save = real_save
    torch.distributed.barrier()
    results["disk_files"] = sorted(os.listdir(os.path.join(tmp, "whole2")))
    return results


def test_scale_faults_nan_sigterm_and_full_disk():
    ranks = run_distributed(_scale_faults, world_size=2)
    for r in ranks:
        assert "not finite for 2 steps in a row (last: step 3" in r["nan"]
        assert "the last good checkpoint is" in r["nan"] and "dcp_00000002" in r["nan"]  # step 2 skipped, checkpointed
        completed, message = r["stopped"]
        assert completed == 2 and message.startswith("stopped by SIGTERM after step 2")  # both ranks, same step
        assert "the last intact checkpoint is" not in r["disk"] and "no checkpoint was written yet" in r["disk"]
        assert r["disk"].startswith("disk full while writing ") and "dcp_00000001" in r["disk"]
        assert r["disk_files"] == ["config.yaml", "data.txt", "metrics.jsonl"]  # the temporary directory removed, nothing else
    assert [rec["loss"] is None for rec in ranks[0]["nan_records"] if "loss" in rec] == [False, True, True]
    whole, resumed = ranks[0]["whole"], ranks[0]["resumed"]
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_preemption_stops_on_each_of_its_signals_and_names_it():
    import signal as signals

    from dinolite.train.faults import Preemption

    before = signals.getsignal(signals.SIGUSR2)
    stop = Preemption(signals=(signals.SIGTERM, signals.SIGUSR2))
    stop.install()
    try:
        assert not stop.now(3)
        signals.raise_signal(signals.SIGUSR2)  # submitit's time-limit signal, under scale/launch_slurm.py
        assert stop.now(4) and stop.stopped_at == 4
    finally:
        stop.uninstall()
    assert signals.getsignal(signals.SIGUSR2) is before  # the previous handler is back
    assert stop.message("runs/x", "runs/x/checkpoint_4.pth").startswith("stopped by SIGUSR2 after step 4")
