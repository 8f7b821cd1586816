"""Distillation (dinolite.train.distill): a frozen teacher with its heads, students with their own EMA copies,
one teacher pass shared by several students, and the errors when a student cannot be scored against the teacher."""
import contextlib

import numpy as np
import pytest
import torch

from dinolite import hub
from dinolite.train import apply_overrides, get_config
from dinolite.train.__main__ import main
from dinolite.checkpoint import CheckpointError, CheckpointNotFoundError
from dinolite.train.config import config_to_dict
from dinolite.train.data import StepBatches
from dinolite.train.distill import DistillArch, build_optimizers, distill_step, load_frozen_teacher
from dinolite.train.meta_arch import DINOv2MetaArch, build_backbone
from dinolite.train.optim import schedule_values

SMALL = ["model.patch_size=8", "model.embed_dim=32", "model.depth=1", "model.num_heads=1", "train.batch_size=8",
         "train.epochs=1", "train.epoch_length=3", "train.num_workers=0", "train.progress=false"]
TEACHER = ["model.patch_size=8", "model.embed_dim=64", "model.depth=2", "model.num_heads=2", "model.img_size=32"]


def teacher_file(tmp_path, overrides=(), name="teacher.pth"):
    """A dinolite-layout teacher file: config and the EMA teacher (backbone + heads) of a fresh dinov3-tiny-cpu."""
    cfg = apply_overrides(get_config("dinov3-tiny-cpu"), TEACHER + list(overrides))
    torch.manual_seed(1)
    arch = DINOv2MetaArch(cfg)
    path = tmp_path / name
    torch.save({"config": config_to_dict(cfg), "teacher": arch.teacher.state_dict(), "step": 0}, path)
    return path


def distill_cfg(path, extra=()):
    return apply_overrides(get_config("tiny-cpu-distill"), SMALL + [f"teacher.checkpoint={path}", *extra])


def batches(cfg, n=64):
    from dinolite.data import build_dataset
    return StepBatches(build_dataset(f"builtin:n={n},size=32"), cfg, total_steps=cfg.total_steps)


def run_steps(cfg, steps, arch=None, optimizers=None):
    arch = arch or DistillArch(cfg)
    optimizers = optimizers or build_optimizers(arch)
    data = batches(cfg)
    outs = []
    for step in steps if isinstance(steps, range) else range(steps):
        values = schedule_values(cfg, step, cfg.total_steps, cfg.train.epoch_length, cfg.train.batch_size)
        outs.append(distill_step(arch, optimizers, data[step], step, values, seed=cfg.train.seed))
    return arch, outs


def test_the_teacher_never_changes(tmp_path):
    cfg = distill_cfg(teacher_file(tmp_path))
    arch = DistillArch(cfg)
    before = {k: v.clone() for k, v in arch.teacher.state_dict().items()}
    arch, outs = run_steps(cfg, 3, arch)
    assert all(not p.requires_grad for p in arch.teacher.parameters())
    assert not arch.teacher.training
    for key, value in arch.teacher.state_dict().items():
        assert torch.equal(value, before[key]), key  # bitwise
    student = arch.students["student"].backbone.state_dict()
    assert any(not torch.equal(student[k], v) for k, v in build_backbone(cfg).state_dict().items())  # it trained
    assert all(torch.isfinite(o["student"]["loss"]) for o in outs)


def test_student_ema_is_the_ema_formula(tmp_path):
    cfg = distill_cfg(teacher_file(tmp_path), ["optim.momentum_teacher=0.9", "optim.final_momentum_teacher=0.9"])
    arch = DistillArch(cfg)
    assert all(torch.equal(p, dict(arch.emas["student"].named_parameters())[k])
               for k, p in arch.students["student"].named_parameters())  # the EMA starts as a copy
    optimizers = build_optimizers(arch)
    run_steps(cfg, 1, arch, optimizers)  # step 0 has lr 0 (warm-up)
    ema_before = {k: v.double().clone() for k, v in arch.emas["student"].named_parameters()}
    run_steps(cfg, range(1, 2), arch, optimizers)
    for name, param in arch.students["student"].named_parameters():
        expected = 0.9 * ema_before[name] + 0.1 * param.detach().double()
        got = dict(arch.emas["student"].named_parameters())[name].double()
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    moved = [n for n, p in arch.students["student"].named_parameters() if not torch.equal(p.double(), ema_before[n])]
    assert moved  # so the check above compares an EMA that really differs from both inputs


def test_the_student_input_is_not_masked(tmp_path):
    """iBOT positions are scored without masking the input: the mask token never enters the student's loss."""
    cfg = distill_cfg(teacher_file(tmp_path))
    arch = DistillArch(cfg)
    batch = batches(cfg)[0]
    assert len(batch["mask_indices"]) > 0
    targets = arch.teacher.targets(batch, 0.07)
    student = arch.students["student"]
    torch.manual_seed(0)
    a = arch.student_losses(student, batch, targets, contextlib.nullcontext)["loss"]
    with torch.no_grad():
        student.backbone.mask_token.fill_(100.0)
    torch.manual_seed(0)
    b = arch.student_losses(student, batch, targets, contextlib.nullcontext)["loss"]
    assert torch.equal(a, b)
    assert targets["ibot"].shape == (len(batch["mask_indices"]), cfg.head.ibot_out_dim)
    torch.testing.assert_close(targets["ibot"].sum(-1), torch.ones(len(batch["mask_indices"])))


def test_students_share_one_teacher_pass(tmp_path):
    cfg = distill_cfg(teacher_file(tmp_path), ["teacher.students=wide:embed_dim=64,num_heads=2;deep:depth=2"])
    arch = DistillArch(cfg)
    calls = []
    forward = arch.teacher.backbone.forward_features
    arch.teacher.backbone.forward_features = lambda *a, **k: calls.append(1) or forward(*a, **k)
    _, outs = run_steps(cfg, 2, arch)
    assert len(calls) == 2  # one teacher pass per step for three students
    assert list(outs[-1]) == ["student", "wide", "deep"]
    assert arch.students["wide"].backbone.embed_dim == 64 and len(arch.students["deep"].backbone.blocks) == 2
    # students are independent: each has its own gradient clip and EMA
    assert len({round(o["grad_norm"].item(), 6) for o in outs[-1].values()}) == 3


@pytest.mark.parametrize("override, message", [
    ("head.dino_out_dim=64", "the teacher's DINO head prototype count is 128 but student's is 64: set head.dino_out_dim=128"),
    ("head.ibot_out_dim=64", "the teacher's iBOT head prototype count is 128 but student's is 64: set head.ibot_out_dim=128"),
    ("model.patch_size=16", "the teacher's patch size is 8 but student's is 16: set model.patch_size=8"),
])
def test_a_student_that_does_not_fit_the_teacher_is_a_one_line_error(tmp_path, override, message):
    extra = [override] + (["crops.global_size=32", "crops.local_size=16"] if "patch" in override else [])
    cfg = distill_cfg(teacher_file(tmp_path), extra)
    with pytest.raises(ValueError) as error:
        DistillArch(cfg)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_gram_weight_in_a_distillation_run_is_refused_not_ignored(tmp_path):
    """Distillation has no Gram term (DINOv3's distillation config: gram.use_loss false): asking for one is an
    error at config time, not a run that silently trains without it."""
    with pytest.raises(ValueError) as error:
        distill_cfg(tmp_path / "teacher.pth", ["gram.weight=1.0"])
    assert "gram.weight" in str(error.value) and "no Gram term" in str(error.value) and "\n" not in str(error.value)
    assert distill_cfg(tmp_path / "teacher.pth", ["gram.weight=0"]).gram.weight == 0


def test_missing_teacher_or_headless_file_is_a_one_line_error(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="not found"):
        DistillArch(distill_cfg(tmp_path / "nope.pth"))
    cfg = apply_overrides(get_config("dinov3-tiny-cpu"), TEACHER)
    headless = tmp_path / "backbone.pth"
    torch.save(hub.export_official(build_backbone(cfg)), headless)  # a released backbone: no heads
    with pytest.raises(CheckpointError, match="holds no config: set teacher.config"):
        load_frozen_teacher(distill_cfg(headless))
    teacher_yaml = tmp_path / "teacher.yaml"
    from dinolite.train.config import save_config
    save_config(cfg, str(teacher_yaml))
    with pytest.raises(CheckpointError, match="no dino_head weights .* released DINOv3 backbones carry none"):
        load_frozen_teacher(distill_cfg(headless, [f"teacher.config={teacher_yaml}"]))
    # an official-layout file with heads ({"teacher": {"backbone.*" with storage_tokens, "dino_head.*", ...}})
    arch = DINOv2MetaArch(cfg)
    official = {f"backbone.{k}": v for k, v in hub.export_official(arch.teacher.backbone).items()}
    official.update({k: v for k, v in arch.teacher.state_dict().items() if not k.startswith("backbone.")})
    assert "backbone.storage_tokens" in official
    torch.save({"teacher": official}, headless)
    teacher = load_frozen_teacher(distill_cfg(headless, [f"teacher.config={teacher_yaml}"]))
    for key, value in arch.teacher.state_dict().items():
        assert torch.equal(dict(teacher.named_parameters(), **dict(teacher.named_buffers())).get(key, value), value)


def test_cli_two_steps_with_two_students(tmp_path, capsys):
    path = teacher_file(tmp_path)
    out = tmp_path / "run"
    args = ["--config", "tiny-cpu-distill", "--data", "builtin:n=64,size=32", "--output-dir", str(out),
            *SMALL, "train.epoch_length=2", f"teacher.checkpoint={path}", "teacher.students=small:embed_dim=16",
            "train.knn_train_size=32", "train.knn_test_size=16"]
    assert main(args) == 0
    assert "done: 2/2 steps" in capsys.readouterr().out
    cfg = distill_cfg(path, ["train.epoch_length=2"])
    for name, dim in (("student", 32), ("small", 16)):
        net = build_backbone(apply_overrides(cfg, [f"model.embed_dim={dim}"]))
        hub.load_official(net, torch.load(out / name / "backbone_official.pth", weights_only=True))
    assert main(args + ["model.patch_size=16", f"--output-dir={tmp_path / 'bad'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the teacher's patch size is 8 but student's is 16") and err.count("\n") == 1


def test_a_teacher_with_one_shared_head_saved_once_loads(tmp_path):
    """DINOv2 small configs share the DINO and iBOT head; the reference teacher file stores it once."""
    path = teacher_file(tmp_path, ["head.share_heads=true", "head.weight_norm_last_layer=true"])
    state = torch.load(path, weights_only=False)
    state["teacher"] = {k: v for k, v in state["teacher"].items() if not k.startswith("ibot_head.")}
    torch.save(state, path)
    teacher = load_frozen_teacher(distill_cfg(path))
    assert teacher.ibot_head is teacher.dino_head
    assert torch.equal(teacher.dino_head.state_dict()["mlp.0.weight"], state["teacher"]["dino_head.mlp.0.weight"])


def test_resume_is_exact_and_continue_from_starts_from_the_students(tmp_path):
    from dinolite.data import build_dataset
    from dinolite.train.distill import train_distill

    cfg = distill_cfg(teacher_file(tmp_path), ["train.epoch_length=2", "train.checkpoint_every=1",
                                               "teacher.students=small:embed_dim=16"])
    data = build_dataset("builtin:n=32,size=32")
    full = train_distill(cfg, data, output_dir=str(tmp_path / "full"), knn_data=None)
    train_distill(cfg, data, output_dir=str(tmp_path / "cut"), knn_data=None, stop_at_step=1)
    resumed = train_distill(cfg, data, output_dir=str(tmp_path / "cut"), knn_data=None)
    for name in ("student", "small"):
        for key, value in full.emas[name].state_dict().items():
            assert torch.equal(resumed.emas[name].state_dict()[key], value), (name, key)
    # a later stage (mixed crop sizes, main student only) starts from the run's student and EMA
    later = apply_overrides(cfg, ["teacher.students=", "crops.size_pairs=32:16:0.5,48:24:0.5", "train.epoch_length=1"])
    stage = train_distill(later, data, output_dir=str(tmp_path / "later"), knn_data=None, stop_at_step=0,
                          continue_from=str(tmp_path / "full"))
    for key, value in full.emas["student"].state_dict().items():
        assert torch.equal(stage.emas["student"].state_dict()[key], value)


def test_texture_mosaics_label_every_pixel_with_its_texture():
    from dinolite.data import SyntheticTextures, TextureMosaics

    mosaics = TextureMosaics(24, 32, seed=3)
    textures = SyntheticTextures(49, 32, seed=3)
    for i in range(24):
        image, label, mask = mosaics[i]
        pixels = torch.as_tensor(np.asarray(image))
        outer, outer_label = textures.generate(i)
        assert label == outer_label == i % 12
        inside = mask != label
        assert set(mask.unique().tolist()) == {label, int(mask[inside][0])}  # two textures of different classes
        assert 0.25 <= inside.float().mean() <= 0.51  # a quarter to half of the image
        assert torch.equal(pixels[~inside], torch.as_tensor(outer)[~inside])
        assert torch.equal(torch.as_tensor(np.asarray(mosaics[i][0])), pixels)  # a function of (seed, i)


def test_texture_scores_per_query_results_are_the_accuracies():
    """per_query=True: which test images each probe got right; their means are the printed accuracies."""
    from dinolite.train import apply_overrides, get_config
    from dinolite.train.distill import texture_scores
    from dinolite.train.meta_arch import build_backbone

    torch.manual_seed(0)
    backbone = build_backbone(apply_overrides(get_config("tiny-cpu"), ["model.depth=1"])).eval()
    s = texture_scores(backbone, n_train=96, n_test=40, dense=False, per_query=True)
    for probe in ("knn", "linear"):
        correct = s[f"{probe}_correct"]
        assert correct.dtype == torch.bool and correct.shape == (40,)
        assert 100 * correct.float().mean().item() == pytest.approx(s[f"{probe}_top1"], abs=0.01)
    assert "knn_correct" not in texture_scores(backbone, n_train=96, n_test=40, dense=False)
