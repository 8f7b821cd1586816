"""DINOv3's three stages at scale on gloo, each on another process count: pre-training (2 processes) -> Gram
stage continuing it (--continue-from: weights, AdamW, step; 1 process; gram.teacher = the pre-training run's
step-2 checkpoint, a scale/ run directory) -> high-resolution stage from its weights only (--init-from: step 0,
fresh AdamW; 2 processes; gram.teacher = the Gram run)."""
import os

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.distributed_utils import run_distributed
from tests.test_scale_train import TINY

DATA = "textures:n=64,size=32"
STAGE = ["train.epoch_length=4", "train.checkpoint_every=1", "train.keep_last=3", "optim.warmup_epochs=0.25"]


def _stage(rank, world, overrides, output_dir, continue_from=None, init_from=None, stop_at_step=None):
    """scale/train.py's train() on this rank; returns (logged steps, Gram terms, AdamW step count, full student,
    full Gram-teacher backbone) (the last three on rank 0)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from scale import train as scale_train
    from scale.checkpoint import full_state_dict
    from scale.config import load_scale_config

    torch.set_num_threads(1)
    cfg, dcfg = load_scale_config("tiny-cpu", TINY + STAGE + [f"train.batch_size={8 // world}", *overrides])
    arch = scale_train.train(cfg, dcfg, DATA, output_dir, stop_at_step=stop_at_step, log=lambda *a: None,
                             continue_from=continue_from, init_from=init_from)
    optim = get_optimizer_state_dict(arch.student, arch._optimizer,
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    adam_state = optim.get("state") or {}  # rank 0 only (full state dict)
    adam_steps = {int(s["step"]) for s in adam_state.values()} if adam_state else {0}
    gram = None if arch.gram_teacher is None else full_state_dict(arch.gram_teacher.backbone)
    return ([r["step"] for r in arch.history if "loss" in r], [r.get("gram") for r in arch.history if "loss" in r],
            adam_steps, full_state_dict(arch.student), gram)


def _teacher_backbone_of(dcp_dir: str, tmp) -> dict:
    """The EMA teacher's backbone in a scale/ checkpoint, read without a process group (torch's DCP converter)."""
    path = os.path.join(tmp, os.path.basename(dcp_dir) + ".pt")
    dcp_to_torch_save(dcp_dir, path)
    teacher = torch.load(path, weights_only=False)["teacher"]
    return {k[len("backbone."):]: v for k, v in teacher.items() if k.startswith("backbone.")}


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stages")
    pre, gram, high = (str(tmp / name) for name in ("pretrain", "gram", "highres"))
    run_distributed(_stage, world_size=2, args=(["train.epochs=1"], pre))
    gram_stage = ["train.epochs=2", "gram.weight=1.0", f"gram.teacher={pre}", "gram.teacher_step=2",
                  "gram.teacher_scale=1.0", "gram.start_epoch=1"]
    gram_run = run_distributed(_stage, world_size=1, args=(gram_stage, gram, pre))[0]
    high_stage = ["train.epochs=1", "crops.size_pairs=32:16:0.5,48:24:0.5", "gram.weight=1.5",
                  f"gram.teacher={gram}", "gram.teacher_scale=1.5", "gram.local_dino_weight=0.5"]
    at_start = run_distributed(_stage, world_size=2, args=(high_stage, high + "_start", None, gram, 0))[0]
    high_run = run_distributed(_stage, world_size=2, args=(high_stage, high, None, gram))[0]
    return dict(tmp=str(tmp), pre=pre, gram=gram, gram_run=gram_run, at_start=at_start, high_run=high_run)


def test_gram_stage_continues_the_pretraining_run_with_its_adamw_on_another_process_count(stages):
    steps, gram_terms, adam_steps, _, gram_backbone = stages["gram_run"]
    assert steps == [5, 6, 7, 8] and all(g > 0 for g in gram_terms)  # from step 4 of the 2-process run
    assert adam_steps == {8}  # the pre-training AdamW state (4 steps) continued, not a fresh one
    # gram.teacher=<scale/ run> with gram.teacher_step=2: its EMA teacher's backbone at step 2
    expected = _teacher_backbone_of(os.path.join(stages["pre"], "dcp_00000002"), stages["tmp"])
    assert gram_backbone.keys() == expected.keys()
    assert all(torch.equal(gram_backbone[k], expected[k]) for k in expected)


def test_highres_stage_starts_from_the_gram_runs_teacher_weights_only(stages):
    steps, _, adam_steps, student, gram_backbone = stages["at_start"]
    # fresh AdamW: no state (torch's full-state getter gives an empty AdamW one zero-lr step), not the Gram run's 8
    assert steps == [] and adam_steps in ({0}, {1})
    final_teacher = _teacher_backbone_of(os.path.join(stages["gram"], "dcp_00000008"), stages["tmp"])
    backbone = {k[len("backbone."):]: v for k, v in student.items() if k.startswith("backbone.")}
    assert all(torch.equal(backbone[k], final_teacher[k]) for k in final_teacher)  # the student starts as the teacher
    assert all(torch.equal(gram_backbone[k], final_teacher[k]) for k in final_teacher)  # gram.teacher=<Gram run>
    steps, gram_terms, adam_steps, _, _ = stages["high_run"]
    assert steps == [1, 2, 3, 4] and adam_steps == {4} and all(g > 0 for g in gram_terms)  # step 0, fresh AdamW


def test_stage_start_errors_are_one_line(tmp_path):
    from dinolite.checkpoint import CheckpointError
    from scale.checkpoint import resolve_run_checkpoint

    assert resolve_run_checkpoint(str(tmp_path)) is None  # not a scale/ run: gram.teacher falls back to dinolite's
    (tmp_path / "dcp_00000002").mkdir()
    (tmp_path / "dcp_00000004").mkdir()
    assert resolve_run_checkpoint(str(tmp_path)).endswith("dcp_00000004")
    assert resolve_run_checkpoint(f"{tmp_path}@2").endswith("dcp_00000002")
    with pytest.raises(CheckpointError, match="kept steps: 2, 4"):
        resolve_run_checkpoint(str(tmp_path), 3)
