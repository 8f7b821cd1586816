"""Gram anchoring in training: the Gram teacher, its loss term and schedule, refreshes, exact resume."""
import json

import pytest
import torch

from dinolite.data import SyntheticShapes
from dinolite.losses import gram_loss
from dinolite.train import DINOv2MetaArch
from dinolite.train.data import StepBatches

from tests.test_train import MICRO, _run, micro_config


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A finished micro run: its checkpoints (steps 4 and 6) are the Gram teachers to anchor to."""
    cfg = micro_config()
    out = tmp_path_factory.mktemp("base")
    _run(cfg, out)
    return out


def gram_config(base_dir, *extra):
    return micro_config("gram.weight=1.0", f"gram.teacher={base_dir}", "gram.teacher_step=4", *extra)


def test_gram_term_is_the_loss_against_the_chosen_checkpoint(base_run):
    cfg = gram_config(base_run, "gram.teacher_scale=2")
    arch = DINOv2MetaArch(cfg)
    early = torch.load(base_run / "checkpoint_00000004.pth", weights_only=False)["teacher"]
    assert all(torch.equal(v, early[f"backbone.{k}"]) for k, v in arch.gram_teacher.backbone.state_dict().items())
    batch = StepBatches(SyntheticShapes(48, 32), cfg, total_steps=6)[0]
    assert batch["gram_crops"].shape == (16, 3, 64, 64)  # the global boxes at 2x the size
    torch.manual_seed(0)
    arch.train()
    out = arch.forward_losses(batch, 0.04, gram_weight=0.0)
    torch.manual_seed(0)
    weighted = arch.forward_losses(batch, 0.04, gram_weight=3.0)
    # The same step with weight 3 adds 3 x the (unchanged) Gram term to the total.
    assert torch.allclose(weighted["gram"], out["gram"]) and out["gram"] > 0
    assert torch.allclose(weighted["loss"] - out["loss"], 3 * out["gram"], atol=1e-6)
    # The Gram term itself: the student's patches of the global crops vs the teacher's on the 2x crops.
    with torch.no_grad():
        torch.manual_seed(0)
        student = arch.student.backbone.forward_features_list([batch["global_crops"]], [batch["masks"]])[0]
        teacher = arch.gram_teacher.patch_features(batch["gram_crops"], (4, 4))
    assert torch.allclose(out["gram"], gram_loss(student["x_norm_patchtokens"], teacher), atol=1e-6)


def test_gram_run_logs_weights_and_resumes_exactly_with_refreshes(base_run, tmp_path):
    # 3 steps a epoch: the Gram loss starts at step 1 (epoch 0.34) and ramps 0, 0.5, 1 over 3 steps (epoch 1) on
    # a cosine with both ends included, the local-crop DINO weight on the same cosine 1, 0.75, 0.5 (official);
    # the Gram teacher is refreshed from the EMA teacher at steps 2 and 4 (at most 2 refreshes).
    extra = ["gram.start_epoch=0.34", "gram.warmup_epochs=1", "gram.update_every=2", "gram.first_update=2",
             "gram.max_updates=2", "gram.teacher_scale=1"]
    cfg = gram_config(base_run, *extra)
    full = _run(cfg, tmp_path / "full")
    records = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl") if '"loss"' in line]
    assert [r["gram_weight"] for r in records] == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.0, 1.0])
    assert [r["local_dino_weight"] for r in records] == pytest.approx([1.0, 1.0, 0.75, 0.5, 0.5, 0.5])
    assert all(r["gram"] > 0 for r in records)
    assert int(full.gram_teacher.n_updates) == 2
    half = _run(cfg, tmp_path / "resumed", stop_at_step=3)
    assert int(half.gram_teacher.n_updates) == 1
    resumed = _run(cfg, tmp_path / "resumed")
    for part in ("student", "teacher", "gram_teacher"):
        a, b = getattr(full, part).state_dict(), getattr(resumed, part).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), part
    # The last refresh copied the EMA teacher before step 4; the EMA teacher has moved on since.
    assert not all(torch.equal(a, b) for a, b in zip(full.gram_teacher.backbone.state_dict().values(),
                                                     full.teacher.backbone.state_dict().values()))


def test_missing_gram_teacher_step_is_a_clear_error(base_run):
    with pytest.raises(FileNotFoundError, match="kept steps: 4, 6"):
        DINOv2MetaArch(gram_config(base_run, "gram.teacher_step=2"))


# ----------------------------------------------------------------------------- continuing a run

def test_continue_from_starts_at_the_runs_step_with_its_weights(base_run, tmp_path):
    cfg = gram_config(base_run, "train.epochs=3")  # the base run ends at step 6; this config at step 9
    same = _run(cfg, tmp_path / "a", continue_from=f"{base_run}@6", stop_at_step=6)
    assert same.completed_steps == 6  # nothing trained: the weights are the checkpoint's
    saved = torch.load(base_run / "checkpoint_00000006.pth", weights_only=False)
    for part in ("student", "teacher"):
        assert all(torch.equal(v, saved[part][k]) for k, v in getattr(same, part).state_dict().items())
    further = _run(cfg, tmp_path / "b", continue_from=str(base_run))  # newest checkpoint: step 6
    assert further.completed_steps == 9
    steps = [json.loads(line)["step"] for line in open(tmp_path / "b" / "metrics.jsonl") if '"loss"' in line]
    assert steps == [7, 8, 9]


def test_continue_from_errors_are_clear(base_run, tmp_path):
    from dinolite.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="does not fit this config") as error:
        _run(micro_config("model.depth=3", "train.epochs=3"), tmp_path / "c", continue_from=str(base_run))
    assert "\n" not in str(error.value)
    with pytest.raises(CheckpointError, match="raise train.epochs"):
        _run(micro_config(), tmp_path / "d", continue_from=str(base_run))
    with pytest.raises(CheckpointError, match="kept steps: 4, 6"):
        _run(micro_config("train.epochs=3"), tmp_path / "e", continue_from=f"{base_run}@5")


def test_cli_gram_refinement_is_one_command(base_run, tmp_path, capsys):
    from dinolite.train.__main__ import main

    out = tmp_path / "refined"
    args = ["--config", "tiny-cpu", "--data", "builtin:n=48,size=32", "--output-dir", str(out),
            "--continue-from", str(base_run), *MICRO, "train.epochs=3", "gram.weight=1.0",
            f"gram.teacher={base_run}", "gram.teacher_step=4"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "continuing from step 6" in printed and "done: 9/9 steps" in printed
    records = [json.loads(line) for line in open(out / "metrics.jsonl") if '"gram"' in line]
    assert [r["step"] for r in records] == [7, 8, 9] and all(r["gram_weight"] == 1.0 for r in records)
    # A wrong teacher step is one line on stderr and exit code 2.
    assert main(args[:-1] + ["gram.teacher_step=5"] + ["--output-dir", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "kept steps: 4, 6" in err and "\n" not in err


def test_continue_from_a_checkpoint_without_optimiser_state(base_run, tmp_path):
    from dinolite.checkpoint import weights_only_state

    full = torch.load(base_run / "checkpoint_00000006.pth", weights_only=False)
    light = weights_only_state(full)
    assert "optimizer" not in light and set(light) == set(full) - {"optimizer"}
    torch.save(light, tmp_path / "weights.pth")
    assert (tmp_path / "weights.pth").stat().st_size < 0.55 * (base_run / "checkpoint_00000006.pth").stat().st_size
    arch = _run(gram_config(base_run, "train.epochs=3"), tmp_path / "run", continue_from=str(tmp_path / "weights.pth"))
    assert arch.completed_steps == 9
    half = weights_only_state(full, dtype=torch.float16)
    assert half["student"]["backbone.cls_token"].dtype == torch.float16 and half["step"] == 6
