"""Gram anchoring in training: the Gram teacher, its loss term and schedule, refreshes, exact resume."""
import json

import pytest
import torch

from dinolite.data import SyntheticShapes
from dinolite.losses import gram_loss
from dinolite.train import DINOv2MetaArch
from dinolite.train.data import StepBatches

from tests.test_train import _run, micro_config


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
    # 3 steps a epoch: the Gram loss starts at step 1 (epoch 0.34) and ramps 0, 0.5, 1 over 3 steps (epoch 1);
    # the Gram teacher is refreshed from the EMA teacher at steps 2 and 4 (at most 2 refreshes).
    extra = ["gram.start_epoch=0.34", "gram.warmup_epochs=1", "gram.update_every=2", "gram.first_update=2",
             "gram.max_updates=2", "gram.teacher_scale=1"]
    cfg = gram_config(base_run, *extra)
    full = _run(cfg, tmp_path / "full")
    records = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl") if '"loss"' in line]
    assert [r["gram_weight"] for r in records] == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.0, 1.0])
    assert [r["local_dino_weight"] for r in records] == [1.0] + [0.5] * 5
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
