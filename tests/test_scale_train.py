"""scale/train.py (FSDP2 on CPU with gloo, in spawned processes) against one process of dinolite's training step.

The same global batch: the ranks' batches (dinolite.train.data.StepBatches with rank r of W) are merged into one
batch for the single process (merge_rank_batches), so both see the same images, crops and masks.

Tolerances are derived from fp32 arithmetic, not tuned: the single-process run is repeated with the ranks'
images in the other order (mathematically the same step: every loss and statistic is a sum or mean over
images, so only the order of fp32 additions changes). How far that run drifts from the first is the
rounding noise of this computation, amplified through AdamW and the EMA over the steps; the distributed run
changes the order of additions in the same places (gradient reduce-scatter, all-reduced SK sums, gathered
KoLeo), so it must stay within a small multiple of that noise (NOISE_FACTOR), plus a floor of 64 fp32 ulps
for values that the reordering happens not to change at all.
"""
import os
import subprocess
import sys

import pytest
import torch

from scale.config import load_scale_config
from tests.distributed_utils import run_distributed

DATA = "textures:n=64,size=32"
STEPS = 4
NOISE_FACTOR = 4.0
FLOOR_ULPS = 64 * torch.finfo(torch.float32).eps
# A tiny ViT (2 blocks, width 48) of tiny-cpu with 64 prototypes; warm-up of one step so every later step moves.
TINY = ["model.depth=2", "model.embed_dim=48", "model.num_heads=3", "head.dino_out_dim=64", "head.ibot_out_dim=64",
        "head.hidden_dim=64", "head.bottleneck_dim=32", "train.epochs=1", f"train.epoch_length={STEPS}",
        "optim.warmup_epochs=0.25", "train.num_workers=0", "train.log_every=1", "train.progress=false",
        "dist.param_dtype=fp32", "dist.koleo_group_size=0"]


def scale_cfg(world: int, global_batch: int = 8, extra=()):
    return load_scale_config("tiny-cpu", TINY + [f"train.batch_size={global_batch // world}", *extra])


def merge_rank_batches(batches: list[dict]) -> dict:
    """The ranks' collated batches (crop-major, B images each) -> one batch of all images, crop-major."""
    B = batches[0]["global_crops"].shape[0] // 2

    def crop_major(key):
        n_crops = batches[0][key].shape[0] // B
        return torch.cat([b[key].unflatten(0, (n_crops, B)) for b in batches], dim=1).flatten(0, 1)

    masks = crop_major("masks")
    mask_indices = masks.flatten().nonzero().flatten()
    weight = (1.0 / masks.sum(-1).clamp(min=1).float())[mask_indices // masks.shape[1]]
    return dict(global_crops=crop_major("global_crops"), local_crops=crop_major("local_crops"), masks=masks,
                mask_indices=mask_indices, masks_weight=weight,
                n_masked_patches=torch.tensor(len(mask_indices)), upperbound=sum(b["upperbound"] for b in batches))


def single_process_run(world: int, reverse: bool = False, steps: int = STEPS, extra=()):
    """dinolite's train_step in this process on the merged global batch of `world` ranks."""
    from dinolite.data import build_dataset
    from dinolite.train.data import StepBatches
    from dinolite.train.loop import train_step
    from dinolite.train.meta_arch import DINOv2MetaArch
    from dinolite.train.optim import build_optimizer, schedule_values

    cfg, _ = scale_cfg(world, extra=extra)
    torch.manual_seed(cfg.train.seed)  # what rank 0 of scale/train.py seeds before the same explicit init
    arch = DINOv2MetaArch(cfg, meta_init=True)
    optimizer = build_optimizer(arch.student, cfg)
    dataset = build_dataset(DATA)
    ranks = [StepBatches(dataset, cfg, cfg.total_steps, 0, r, world) for r in range(world)]
    losses = []
    for step in range(steps):
        parts = [r[step] for r in ranks]
        batch = merge_rank_batches(parts[::-1] if reverse else parts)
        values = schedule_values(cfg, step, cfg.total_steps, cfg.train.epoch_length, cfg.train.batch_size * world)
        out = train_step(arch, optimizer, batch, step, values, seed=cfg.train.seed, clip_grad=cfg.optim.clip_grad)
        losses.append([out[k].item() for k in ("loss", "dino", "ibot", "koleo", "gram") if k in out])
    return torch.tensor(losses, dtype=torch.float64), arch.student.state_dict(), arch.teacher.state_dict()


def _scale_run(rank, world, overrides, output_dir=None, stop_at_step=None):
    """scale/train.py's train() on this rank; rank 0 returns (losses [steps, 4], student, teacher, AdamW state)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from scale import train as scale_train
    from scale.checkpoint import full_state_dict

    torch.set_num_threads(1)
    cfg, dcfg = scale_cfg(world, extra=overrides)
    arch = scale_train.train(cfg, dcfg, DATA, output_dir, stop_at_step=stop_at_step, log=lambda *a: None)
    losses = torch.tensor([[r[k] for k in ("loss", "dino", "ibot", "koleo", "gram") if k in r] for r in arch.history
                           if "loss" in r],
                          dtype=torch.float64)
    optim = get_optimizer_state_dict(arch.student, arch._optimizer,
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return losses, full_state_dict(arch.student), full_state_dict(arch.teacher), optim


def _max_diff(a: dict, b: dict) -> dict:
    return {k: (a[k].double() - b[k].double()).abs().max().item() for k in b if k in a}


def assert_within_noise(run, ref, noise_run, what):
    """run, ref, noise_run: (losses [steps, 4], student, teacher, ...). Returns the measured errors."""
    losses, student, teacher = run[:3]
    ref_losses, ref_student, ref_teacher = ref
    noise = (noise_run[0] - ref_losses).abs()
    tol = NOISE_FACTOR * noise + FLOOR_ULPS * ref_losses.abs()
    err = (losses - ref_losses).abs()
    assert (err <= tol).all(), f"{what}: loss error {err.max():.3g} > tolerance (noise {noise.max():.3g})"
    report = {"loss": err.max().item(), "loss_noise": noise.max().item()}
    for name, state, ref_state, noise_state in (("student", student, ref_student, noise_run[1]),
                                                ("teacher", teacher, ref_teacher, noise_run[2])):
        assert state.keys() <= ref_state.keys() and len(state) >= len(ref_state) - 8  # shared head listed once
        errs, noises = _max_diff(state, ref_state), _max_diff(noise_state, ref_state)
        for key, e in errs.items():
            scale_ = ref_state[key].abs().max().item()
            assert e <= NOISE_FACTOR * noises[key] + FLOOR_ULPS * scale_, \
                f"{what}: {name}.{key} differs by {e:.3g} (fp32 noise {noises[key]:.3g}, |w| {scale_:.3g})"
        report[name] = max(errs.values())
        report[f"{name}_noise"] = max(noises.values())
    return report


@pytest.fixture(scope="module")
def reference():
    return {world: (single_process_run(world), single_process_run(world, reverse=True)) for world in (2, 4)}


def _ema_on_shards(rank, world):
    """dinolite.ema.ema_update_ on FSDP2-sharded teacher and student vs the same update on full tensors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from dinolite.ema import ema_update_

    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(5, 7), torch.nn.Linear(5, 7)  # 7 rows: uneven shards
    expected = {k: teacher.state_dict()[k].mul(0.9).add(v, alpha=1 - 0.9) for k, v in student.state_dict().items()}
    mesh = init_device_mesh("cpu", (world,))
    plain_teacher = torch.nn.Linear(5, 7)
    for module in (student, teacher):
        fully_shard(module, mesh=mesh)
    ema_update_(teacher, student, 0.9)
    try:
        ema_update_(plain_teacher, student, 0.9)
        mismatch = None
    except ValueError as e:
        mismatch = str(e)
    return {k: v.full_tensor() for k, v in teacher.state_dict().items()}, expected, mismatch


def _jobs(rank, world, jobs):
    """Several jobs in the same processes, one after the other (each builds its own model): fewer spawns."""
    return [function(rank, world, *args) for function, args in jobs]


GRAM = ["gram.weight=1.0", "gram.teacher_scale=1.0", "gram.update_every=2", "gram.first_update=2", "gram.max_updates=1"]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """2 processes: an uninterrupted run (with an output directory: checkpoint and export at the end), the same run
    stopped after step 2 (its checkpoint is the last thing it writes), and the activation-checkpointing gradients."""
    run_dir, stopped_dir = (str(tmp_path_factory.mktemp(name)) for name in ("scale_run", "scale_stopped"))
    keep = ["train.checkpoint_every=1", "train.keep_last=2", "dist.keep_every=2"]  # checkpoints do not change the run
    jobs = [(_scale_run, (keep, run_dir)), (_scale_run, ([], stopped_dir, 2)), (_grads_by_activation_checkpointing, ()),
            (_ema_on_shards, ())]
    run, stopped, grads, ema = run_distributed(_jobs, world_size=2, args=(jobs,))[0]
    return dict(run_dir=run_dir, run=run, stopped_dir=stopped_dir, stopped=stopped, grads=grads, ema=ema)


def test_ema_update_works_shard_by_shard(two_processes):
    updated, expected, mismatch = two_processes["ema"]
    for key in expected:  # the same two fp32 operations per element as on the full tensors: equal to the last bit
        assert torch.equal(updated[key], expected[key]), key
    assert mismatch.startswith("teacher and student parameters are sharded differently")


@pytest.fixture(scope="module")
def four_processes(two_processes):
    """4 processes: load the checkpoint the 2 processes saved at step 2, then the run from scratch."""
    from scale.checkpoint import checkpoint_dir

    jobs = [(_load_state, ([], checkpoint_dir(two_processes["stopped_dir"], 2))), (_scale_run, ([],))]
    loaded, run = run_distributed(_jobs, world_size=4, args=(jobs,))[0]
    return dict(loaded=loaded, run=run)


@pytest.fixture(scope="module")
def resumed_and_gram(two_processes):
    """2 new processes: resume the stopped run; then a run anchored to the first run's exported teacher."""
    gram = GRAM + [f"gram.teacher={os.path.join(two_processes['run_dir'], 'teacher_backbone_official.pth')}"]
    jobs = [(_scale_run, ([], two_processes["stopped_dir"])), (_scale_run, (gram,))]
    resumed, gram_run = run_distributed(_jobs, world_size=2, args=(jobs,))[0]
    return dict(resumed=resumed, gram=gram_run, gram_overrides=gram)


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp2_equals_one_process_on_the_same_global_batch(world, reference, two_processes, four_processes):
    ref, noise = reference[world]
    run = two_processes["run"] if world == 2 else four_processes["run"]
    assert len(run[0]) == STEPS and torch.isfinite(run[0]).all()
    assert (noise[0] - ref[0]).abs().max() > 0  # the reordering does change the rounding: the noise is measured
    report = assert_within_noise(run, ref, noise, f"{world} processes")
    print(f"\n{world} processes vs 1: {report}")


def test_sharded_gram_teacher_equals_one_process(resumed_and_gram):
    """DINOv3 Gram anchoring to the exported teacher of the 2-process run, refreshed from the EMA teacher at step 2."""
    gram = resumed_and_gram["gram_overrides"]
    ref = single_process_run(2, extra=gram)
    noise = single_process_run(2, reverse=True, extra=gram)
    run = resumed_and_gram["gram"]
    assert run[0].shape == (STEPS, 5) and torch.isfinite(run[0]).all() and (run[0][:, 4] > 0).all()  # Gram term
    report = assert_within_noise(run, ref, noise, "Gram anchoring, 2 processes")
    print(f"\nGram, 2 processes vs 1: {report}")


def _grads_by_activation_checkpointing(rank, world):
    from dinolite.data import build_dataset
    from dinolite.train.data import StepBatches
    from scale import parallelize

    torch.set_num_threads(1)
    grads = {}
    for mode in ("none", "full", "selective"):
        # drop path on: the recomputation must draw the same random subsets (checkpoint restores the RNG state)
        cfg, dcfg = scale_cfg(world, extra=[f"dist.activation_checkpointing={mode}", "model.drop_path_rate=0.3"])
        arch = parallelize.build_sharded_arch(cfg, dcfg, torch.device("cpu"))
        batch = StepBatches(build_dataset(DATA), cfg, cfg.total_steps, 0, rank, world)[0]
        torch.manual_seed(100 + rank)
        arch.train()
        arch.forward_losses(batch, teacher_temp=0.04)["loss"].backward()
        grads[mode] = {name: p.grad.full_tensor() for name, p in arch.student.named_parameters()}
    return grads


def test_activation_checkpointing_gives_the_same_gradients_as_none(two_processes):
    grads = two_processes["grads"]
    reference = grads["none"]
    assert any(g.abs().max() > 0 for name, g in reference.items() if "blocks.1." in name)
    for mode in ("full", "selective"):
        assert grads[mode].keys() == reference.keys()
        for name, g in grads[mode].items():
            # The same fp32 ops on the same inputs, recomputed: equal up to a few ulps of the gradient's size.
            tol = FLOOR_ULPS * reference[name].abs().max().item()
            assert (g - reference[name]).abs().max().item() <= tol, f"{mode}: {name}"


def _load_state(rank, world, overrides, path):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from dinolite.train.optim import build_optimizer
    from scale import checkpoint as ckpt
    from scale import parallelize

    torch.set_num_threads(1)
    cfg, dcfg = scale_cfg(world, extra=overrides)
    arch = parallelize.build_sharded_arch(cfg, dcfg, torch.device("cpu"))
    optimizer = build_optimizer(arch.student, cfg)
    progress = ckpt.load_checkpoint(arch, optimizer, path)
    optim = get_optimizer_state_dict(arch.student, optimizer,
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return progress, ckpt.full_state_dict(arch.student), ckpt.full_state_dict(arch.teacher), optim


def _assert_equal_states(a: dict, b: dict, what: str):
    assert a.keys() == b.keys(), what
    for key in a:
        if isinstance(a[key], dict):
            _assert_equal_states(a[key], b[key], f"{what}.{key}")
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), f"{what}.{key}"


def test_checkpoint_saved_by_2_processes_loads_into_1_and_4(two_processes, four_processes):
    from scale.checkpoint import list_checkpoints

    output_dir, (_, *saved) = two_processes["stopped_dir"], two_processes["stopped"]
    path = dict(list_checkpoints(output_dir))[2]  # (the resume test continues this run to step 4)
    assert os.listdir(path) and os.path.isfile(os.path.join(output_dir, "config.yaml"))
    for world in (1, 4):  # the same global batch of 8: train.batch_size = 8 / world
        loaded = four_processes["loaded"] if world == 4 else run_distributed(_load_state, 1, args=([], path))[0]
        progress, student, teacher, optim = loaded
        assert progress == {"step": 2, "global_batch": 8, "world_size": 2}
        _assert_equal_states(student, saved[0], f"student loaded by {world}")
        _assert_equal_states(teacher, saved[1], f"teacher loaded by {world}")
        _assert_equal_states(optim["state"], saved[2]["state"], f"AdamW state loaded by {world}")
        assert len(optim["state"]) == len(student) - 8 and optim["state"]  # every (unshared) weight has moments


def test_interrupted_and_resumed_run_continues_exactly(two_processes, resumed_and_gram):
    """Resume in new processes from the checkpoint of step 2 (test_checkpoint_... checks it)."""
    losses, student, teacher, _ = two_processes["run"]
    resumed_losses, resumed_student, resumed_teacher, _ = resumed_and_gram["resumed"]
    assert torch.equal(resumed_losses, losses[2:])  # steps 3 and 4, bitwise
    _assert_equal_states(resumed_student, student, "student")
    _assert_equal_states(resumed_teacher, teacher, "teacher")


def test_checkpoints_every_step_keep_the_last_2_and_every_second(two_processes):
    names = sorted(os.listdir(two_processes["run_dir"]))
    assert names == ["config.yaml", "data.txt", "dcp_00000002", "dcp_00000003", "dcp_00000004", "metrics.jsonl",
                     "teacher_backbone_official.pth"]  # no temporary directory left


def test_export_writes_the_teacher_backbone_in_the_official_layout(two_processes, tmp_path):
    from dinolite.hub import load_official
    from dinolite.train.meta_arch import build_backbone
    from scale.export import main as export_main

    output_dir, (_, _, teacher, _) = two_processes["run_dir"], two_processes["run"]
    out = str(tmp_path / "teacher.pth")
    assert export_main([output_dir, "--out", out]) == 0
    cfg, _ = scale_cfg(2)
    for path in (out, os.path.join(output_dir, "teacher_backbone_official.pth")):  # exported and end-of-run files
        backbone = load_official(build_backbone(cfg), torch.load(path, weights_only=True))  # strict
        _assert_equal_states(backbone.state_dict(), {k.removeprefix("backbone."): v for k, v in teacher.items()
                                                     if k.startswith("backbone.")}, path)
    assert export_main([output_dir, "--step", "1"]) == 2  # deleted (keep_last=2): one-line error
