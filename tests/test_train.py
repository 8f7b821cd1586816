"""DINOv2 training: parameter groups, schedules, teacher, loss decrease, exact resume, export."""
import json
import math
import os
import warnings

import pytest
import torch

from dinolite.data import SyntheticShapes
from dinolite.hub import load_official
from dinolite.models import VisionTransformer
from dinolite.train import DINOv2MetaArch, apply_overrides, get_config, load_config, save_config, train, train_step
from dinolite.train import loop, run
from dinolite.train.data import StepBatches
from dinolite.train.loop import _small_batch_warning, restore_training_state, training_state
from dinolite.train.optim import (
    StepValues,
    apply_schedule_,
    build_optimizer,
    build_param_groups,
    param_rule,
    schedule_values,
)
from dinolite.train.run import OutputDirError, intra_op_threads

# A micro network: 2 blocks of width 32, 64 prototypes, 8 images per step, 2 local crops.
MICRO = [
    "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.drop_path_rate=0.1",
    "head.dino_out_dim=64", "head.ibot_out_dim=64", "head.hidden_dim=64", "head.bottleneck_dim=32",
    "crops.n_local=2", "train.batch_size=8", "train.epochs=2", "train.epoch_length=3",
    "train.knn_every=0", "train.monitor_every=3", "train.log_every=1", "train.progress=false",
    "train.checkpoint_every=2", "train.keep_last=2", "optim.warmup_epochs=1", "loss.warmup_teacher_temp_epochs=1",
    "train.num_workers=0", "head.share_heads=false", "model.layerscale_init=1e-5", "optim.base_lr=0.004",
]
DATA_SPEC = "builtin:n=48,size=32"


def micro_config(*extra):
    return apply_overrides(get_config("tiny-cpu"), MICRO + list(extra))


def micro_batch(cfg, step=0):
    return StepBatches(SyntheticShapes(48, 32), cfg, total_steps=10)[step]


# ----------------------------------------------------------------------------- param groups

def test_param_rules_match_dinov2():
    depth, decay = 2, 0.9
    rule = lambda name: param_rule(name, depth, decay, 0.2)  # noqa: E731
    # layer id 0: patch embedding (x0.2 more), tokens, position embedding; they keep weight decay
    assert rule("backbone.patch_embed.proj.weight") == dict(lr_mult=pytest.approx(0.9 ** 3 * 0.2), wd_mult=1.0, is_last_layer=False)
    assert rule("backbone.patch_embed.proj.bias")["wd_mult"] == 0.0
    for name in ("backbone.cls_token", "backbone.pos_embed", "backbone.mask_token", "backbone.register_tokens"):
        assert rule(name) == dict(lr_mult=pytest.approx(0.9 ** 3), wd_mult=1.0, is_last_layer=False)
    # block i -> layer id i + 1
    assert rule("backbone.blocks.0.attn.qkv.weight")["lr_mult"] == pytest.approx(0.9 ** 2)
    assert rule("backbone.blocks.1.mlp.fc1.weight") == dict(lr_mult=pytest.approx(0.9), wd_mult=1.0, is_last_layer=False)
    # no weight decay on biases, norms, LayerScale gammas
    assert rule("backbone.blocks.1.norm1.weight")["wd_mult"] == 0.0
    assert rule("backbone.blocks.0.ls2.gamma")["wd_mult"] == 0.0
    assert rule("backbone.blocks.0.attn.proj.bias")["wd_mult"] == 0.0
    # final norm and heads: multiplier 1
    assert rule("backbone.norm.weight") == dict(lr_mult=1.0, wd_mult=0.0, is_last_layer=False)
    assert rule("dino_head.mlp.0.weight") == dict(lr_mult=1.0, wd_mult=1.0, is_last_layer=False)
    assert rule("ibot_head.last_layer.weight_v") == dict(lr_mult=1.0, wd_mult=1.0, is_last_layer=True)
    assert rule("dino_head.last_layer.weight_g")["is_last_layer"] is True


@pytest.mark.parametrize("share", [False, True])
def test_param_groups_cover_every_parameter_once(share):
    cfg = micro_config(f"head.share_heads={share}")
    arch = DINOv2MetaArch(cfg)
    groups = build_param_groups(arch.student, cfg.model.depth, 0.9, 0.2)
    names = [n for g in groups for n in g["names"]]
    assert sorted(names) == sorted(n for n, _ in arch.student.named_parameters())
    assert len(names) == len(set(names))
    assert any(n.startswith("ibot_head.") for n in names) != share  # a shared head is listed once
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["backbone.blocks.0.ls1.gamma"]["wd_mult"] == 0.0
    assert by_name["backbone.patch_embed.proj.weight"]["lr_mult"] == pytest.approx(0.9 ** 3 * 0.2)
    # apply_schedule_ writes lr * multiplier, 0 for the frozen last layer, wd * multiplier
    optimizer = build_optimizer(arch.student, cfg)
    apply_schedule_(optimizer, StepValues(lr=0.01, last_layer_lr=0.0, weight_decay=0.1, momentum=0.99, teacher_temp=0.05))
    for group in optimizer.param_groups:
        expected_lr = 0.0 if group["is_last_layer"] else 0.01 * group["lr_mult"]
        assert group["lr"] == pytest.approx(expected_lr)
        assert group["weight_decay"] == pytest.approx(0.1 * group["wd_mult"])
    assert optimizer.defaults["betas"] == (0.9, 0.999)


# ----------------------------------------------------------------------------- schedules

def test_schedule_values_at_chosen_steps():
    cfg = apply_overrides(get_config("tiny-cpu"), [
        "optim.base_lr=0.004", "optim.warmup_epochs=1", "optim.min_lr=1e-6", "optim.freeze_last_layer_epochs=1",
        "loss.warmup_teacher_temp_epochs=3", "loss.warmup_teacher_temp=0.04", "loss.teacher_temp=0.07",
        "optim.momentum_teacher=0.99", "optim.final_momentum_teacher=1.0"])
    total, epoch, batch = 100, 10, 64
    peak = 0.004 * math.sqrt(64 / 1024)  # = 0.001
    v = lambda s: schedule_values(cfg, s, total, epoch, batch)  # noqa: E731
    assert v(0).lr == 0.0 and v(9).lr == pytest.approx(peak)  # linear warm-up, both ends included
    assert v(10).lr == pytest.approx(peak)
    assert v(55).lr == pytest.approx((peak + 1e-6) / 2)  # half-way through the cosine
    assert v(5).last_layer_lr == 0.0 and v(10).last_layer_lr == pytest.approx(peak)
    assert v(0).weight_decay == pytest.approx(0.04) and v(50).weight_decay == pytest.approx(0.22)
    assert v(0).momentum == pytest.approx(0.99) and v(50).momentum == pytest.approx((0.99 + 1.0) / 2)
    assert v(100).momentum == 1.0
    assert v(0).teacher_temp == pytest.approx(0.04) and v(29).teacher_temp == pytest.approx(0.07)
    assert v(15).teacher_temp == pytest.approx(0.04 + 0.03 * 15 / 29) and v(80).teacher_temp == 0.07


# ----------------------------------------------------------------------------- teacher

def test_teacher_is_a_frozen_distinct_copy():
    cfg = micro_config()
    torch.manual_seed(0)
    arch = DINOv2MetaArch(cfg)
    assert arch.teacher is not arch.student
    student_ptrs = {p.data_ptr() for p in arch.student.parameters()}
    assert all(p.data_ptr() not in student_ptrs for p in arch.teacher.parameters())
    assert not any(p.requires_grad for p in arch.teacher.parameters())
    for (n1, t), (n2, s) in zip(arch.teacher.state_dict().items(), arch.student.state_dict().items()):
        assert n1 == n2 and torch.equal(t, s)
    arch.train()
    assert arch.student.training and not arch.teacher.training  # no drop path in the teacher

    batch = micro_batch(cfg)
    before = {k: v.clone() for k, v in arch.teacher.state_dict().items()}
    out = arch.forward_losses(batch, teacher_temp=0.04)
    out["loss"].backward()
    assert all(p.grad is None for p in arch.teacher.parameters())
    assert all(torch.equal(v, before[k]) for k, v in arch.teacher.state_dict().items())
    assert arch.student.backbone.blocks[0].attn.qkv.weight.grad is not None

    # train_step: AdamW on the student, then teacher = m * teacher + (1 - m) * student
    arch.student.zero_grad()
    optimizer = build_optimizer(arch.student, cfg)
    values = StepValues(lr=1e-3, last_layer_lr=1e-3, weight_decay=0.04, momentum=0.9, teacher_temp=0.04)
    train_step(arch, optimizer, batch, 0, values)
    name = "backbone.blocks.1.mlp.fc2.weight"
    s, t = dict(arch.student.named_parameters())[name], dict(arch.teacher.named_parameters())[name]
    assert not torch.equal(s, before[name])
    torch.testing.assert_close(t, 0.9 * before[name] + 0.1 * s, rtol=0, atol=1e-7)


def test_meta_device_init():
    cfg = micro_config("model.layerscale_init=1e-5")
    arch = DINOv2MetaArch(cfg, meta_init=True)
    for name, p in list(arch.student.named_parameters()) + list(arch.student.named_buffers()):
        assert p.device.type == "cpu" and torch.isfinite(p).all(), name
    assert torch.all(arch.student.backbone.blocks[0].ls1.gamma == 1e-5)
    assert arch.student.dino_head.last_layer.weight_g.eq(1).all()
    assert torch.equal(arch.teacher.backbone.pos_embed, arch.student.backbone.pos_embed)
    assert 0.01 < arch.student.backbone.blocks[0].attn.qkv.weight.std() < 0.03  # trunc_normal(0.02)


# ----------------------------------------------------------------------------- optimisation

@pytest.mark.parametrize("centering", ["sinkhorn_knopp", "softmax_center"])
def test_few_steps_lower_the_loss_on_a_fixed_batch(centering):
    cfg = micro_config(f"loss.centering={centering}", "model.drop_path_rate=0")
    torch.manual_seed(0)
    arch = DINOv2MetaArch(cfg)
    optimizer = build_optimizer(arch.student, cfg)
    batch = micro_batch(cfg)
    values = StepValues(lr=2e-3, last_layer_lr=2e-3, weight_decay=0.04, momentum=0.9, teacher_temp=0.04)
    losses = [train_step(arch, optimizer, batch, s, values)["loss"].item() for s in range(12)]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.1, losses


def test_small_batch_warning_names_remedies():
    message = _small_batch_warning(micro_config(), world_size=1)
    assert "batch_size=8" in message and "0.9995" in message and "accumulation" in message
    assert _small_batch_warning(get_config("tiny-cpu"), world_size=1) is None  # 64 images


# ----------------------------------------------------------------------------- loop, resume, export

def _run(cfg, output_dir, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train(cfg, DATA_SPEC, output_dir=str(output_dir), knn_data=None, **kwargs)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    cfg = micro_config("loss.centering=softmax_center")  # stateful centering: must be checkpointed too
    out = tmp_path_factory.mktemp("full")
    arch = _run(cfg, out)
    return cfg, out, arch


def _records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_resume_is_bitwise_exact(full_run, tmp_path):
    cfg, full_dir, full = full_run
    assert full.completed_steps == full.total_steps == 6
    half = _run(cfg, tmp_path, stop_at_step=3)  # "interrupted" after 3 steps
    assert half.completed_steps == 3
    assert not os.path.exists(tmp_path / "teacher_backbone_official.pth")  # not finished
    resumed = _run(cfg, tmp_path)  # a fresh call: everything comes from the checkpoint
    assert resumed.completed_steps == 6
    for part in ("student", "teacher"):
        a, b = getattr(full, part).state_dict(), getattr(resumed, part).state_dict()
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{part}.{key} differs after resume"
    assert torch.equal(full.dino_center.center, resumed.dino_center.center)
    assert not torch.equal(full.dino_center.center, torch.zeros_like(full.dino_center.center))
    # The logged losses of steps 4..6 are identical too.
    losses = lambda recs: [(r["step"], r["loss"]) for r in recs if "loss" in r and r["step"] > 3]  # noqa: E731
    assert losses(_records(full_dir / "metrics.jsonl")) == losses(_records(tmp_path / "metrics.jsonl"))
    # keep_last=2 with checkpoint_every=2: steps 4 and 6 remain
    assert sorted(os.listdir(tmp_path)).count("checkpoint_00000006.pth") == 1
    assert not os.path.exists(tmp_path / "checkpoint_00000002.pth")


def test_run_outputs_and_export(full_run):
    cfg, out, arch = full_run
    assert (out / "config.yaml").exists()
    records = _records(out / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert {"dino", "ibot", "koleo", "lr", "teacher_temp", "momentum", "images_per_s"} <= steps[0].keys()
    assert any("monitor/teacher_entropy" in r for r in records)
    # The exported teacher backbone loads strictly into a fresh model and gives the same features.
    state = torch.load(out / "teacher_backbone_official.pth", weights_only=True)
    m = cfg.model
    fresh = VisionTransformer(img_size=m.img_size, patch_size=m.patch_size, embed_dim=m.embed_dim, depth=m.depth,
                              num_heads=m.num_heads)
    load_official(fresh, state)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(fresh.eval().forward(x), arch.teacher.backbone.forward(x), rtol=0, atol=0)
    assert not torch.equal(fresh.pos_embed, arch.student.backbone.pos_embed)  # teacher, not student


def test_resume_with_other_config_is_an_error(full_run):
    cfg, out, _ = full_run
    other = apply_overrides(cfg, ["optim.base_lr=0.001"])
    with pytest.raises(ValueError, match=r"optim.base_lr: saved 0.004 vs now 0.001"):
        _run(other, out)
    # run-control keys may change
    _run(apply_overrides(cfg, ["train.log_every=5"]), out)


def test_resume_says_from_which_step_and_checkpoint(full_run, capsys):
    cfg, out, _ = full_run
    capsys.readouterr()
    _run(cfg, out)  # the run is complete: it resumes at its last step and has nothing left to do
    assert f"resuming from step 6 (checkpoint {out / 'checkpoint_00000006.pth'})" in capsys.readouterr().out


def test_start_up_removes_temp_files_of_a_killed_checkpoint_save(full_run, capsys):
    cfg, out, _ = full_run
    stale = out / ".tmp_checkpoint_00000007.pthq3x_8kz1"  # what SIGKILL in atomic_save leaves
    stale.write_bytes(b"half a checkpoint")
    checkpoints = {p.name: p.read_bytes() for p in out.glob("checkpoint_*.pth")}
    _run(cfg, out)
    assert not stale.exists()
    assert {p.name: p.read_bytes() for p in out.glob("checkpoint_*.pth")} == checkpoints  # complete ones untouched
    assert f"removed {stale}" in capsys.readouterr().out


def test_a_directory_without_checkpoint_accepts_a_new_config(tmp_path):
    # What a run that failed before its first checkpoint leaves: its config and a few log lines.
    failed = micro_config("train.batch_size=16")
    save_config(failed, str(tmp_path / "config.yaml"))
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 99.0}) + "\n")
    cfg = micro_config("train.epochs=1")
    arch = _run(cfg, tmp_path)
    assert arch.completed_steps == 3
    assert load_config(str(tmp_path / "config.yaml")) == cfg
    assert [(r["step"], r["loss"] == 99.0) for r in _records(tmp_path / "metrics.jsonl") if "loss" in r] == [
        (1, False), (2, False), (3, False)]  # the failed run's lines are gone
    # Now the directory holds a checkpoint: a different config is refused and nothing changes.
    with pytest.raises(OutputDirError, match=r"train.batch_size: saved 8 vs now 16"):
        _run(failed, tmp_path)
    assert load_config(str(tmp_path / "config.yaml")) == cfg


def test_auto_threads_leave_one_core_per_data_worker(monkeypatch):
    monkeypatch.setattr(run, "available_cores", lambda: 4)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(8)
        assert [intra_op_threads(0, workers) for workers in (0, 1, 3, 4, 8)] == [4, 3, 1, 1, 1]
        assert intra_op_threads(6, 3) == 6  # train.threads=6: as asked
        torch.set_num_threads(2)  # OMP_NUM_THREADS=2 (or an earlier torch.set_num_threads) caps auto
        assert intra_op_threads(0, 1) == 2
    finally:
        torch.set_num_threads(previous)


class _ReadLog(torch.utils.data.Dataset):
    """SyntheticShapes that appends "pid threads" to a file for every image read (from any process)."""

    def __init__(self, path):
        self.data, self.path = SyntheticShapes(48, 32), path

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        with open(self.path, "a") as f:
            f.write(f"{os.getpid()} {torch.get_num_threads()}\n")
        return self.data[i]


def test_training_and_data_worker_threads(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "available_cores", lambda: 3)
    step_threads = []
    real_step = loop.train_step

    def recording_step(*args, **kwargs):
        step_threads.append(torch.get_num_threads())
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", recording_step)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        log = tmp_path / "reads.txt"
        cfg = micro_config("train.epochs=1", "train.epoch_length=1", "train.num_workers=1")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train(cfg, _ReadLog(log), knn_data=None)
        assert step_threads == [2]  # 3 cores, 1 of them for the data worker
        reads = [line.split() for line in log.read_text().splitlines()]
        assert len(reads) == 8 and str(os.getpid()) not in {pid for pid, _ in reads}  # read in the worker
        assert {threads for _, threads in reads} == {"1"}  # one thread in the worker
        assert torch.get_num_threads() == 4  # restored after the run
        step_threads.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train(micro_config("train.epochs=1", "train.epoch_length=1", "train.threads=1"), DATA_SPEC, knn_data=None)
        assert step_threads == [1] and torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(previous)


def test_training_state_round_trip(full_run):
    cfg, _, arch = full_run
    optimizer = build_optimizer(arch.student, cfg)
    state = training_state(arch, optimizer, 6, cfg)
    fresh = DINOv2MetaArch(cfg)
    assert restore_training_state(state, fresh, build_optimizer(fresh.student, cfg)) == 6
    assert torch.equal(fresh.teacher.backbone.cls_token, arch.teacher.backbone.cls_token)
    assert torch.equal(fresh.ibot_center.center, arch.ibot_center.center)


def test_step_batches_are_a_function_of_the_step():
    cfg = micro_config()
    data = SyntheticShapes(48, 32)
    a = StepBatches(data, cfg, total_steps=10)
    b = StepBatches(data, cfg, total_steps=10, start_step=4)
    assert torch.equal(a[5]["global_crops"], b[1]["global_crops"]) and torch.equal(a[5]["masks"], b[1]["masks"])
    assert not torch.equal(a[5]["global_crops"], a[6]["global_crops"])
    # every image once per epoch (48 images, 8 per step: 6 steps per epoch)
    seen = sorted(i for s in range(6) for i in a.indices(s))
    assert seen == list(range(48))
    assert a.indices(6) != a.indices(0)  # a new permutation in the next epoch
    two_ranks = [StepBatches(data, cfg, 10, rank=r, world_size=2).indices(0) for r in (0, 1)]
    assert not set(two_ranks[0]) & set(two_ranks[1])


def test_training_warns_when_knn_falls_below_its_value_at_initialisation(tmp_path, monkeypatch):
    import dinolite.train.loop as loop

    scores = iter([40.0, 42.0, 35.0, 30.0, 29.0, 28.0, 27.0])  # step 0 (init), then every step
    monkeypatch.setattr(loop, "knn_accuracy", lambda *args, **kwargs: next(scores))
    cfg = micro_config("train.knn_every=1", "train.monitor_every=0")
    with pytest.warns(UserWarning, match=r"step 3: the teacher's kNN top-1 \(%\) is 30, below its first value 40"):
        train(cfg, DATA_SPEC, knn_data=("stub", "stub"))
