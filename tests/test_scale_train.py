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


def single_process_run(world: int, reverse: bool = False, steps: int = STEPS):
    """dinolite's train_step in this process on the merged global batch of `world` ranks."""
    from dinolite.data import build_dataset
    from dinolite.train.data import StepBatches
    from dinolite.train.loop import train_step
    from dinolite.train.meta_arch import DINOv2MetaArch
    from dinolite.train.optim import build_optimizer, schedule_values

    cfg, _ = scale_cfg(world)
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
        losses.append([out[k].item() for k in ("loss", "dino", "ibot", "koleo")])
    return torch.tensor(losses, dtype=torch.float64), arch.student.state_dict(), arch.teacher.state_dict()


def _scale_run(rank, world, overrides, output_dir=None, stop_at_step=None):
    from scale import train as scale_train
    from scale.checkpoint import full_state_dict

    torch.set_num_threads(1)
    cfg, dcfg = scale_cfg(world, extra=overrides)
    arch = scale_train.train(cfg, dcfg, DATA, output_dir, stop_at_step=stop_at_step, log=lambda *a: None)
    losses = torch.tensor([[r[k] for k in ("loss", "dino", "ibot", "koleo")] for r in arch.history],
                          dtype=torch.float64)
    return losses, full_state_dict(arch.student), full_state_dict(arch.teacher)


def _max_diff(a: dict, b: dict) -> dict:
    return {k: (a[k].double() - b[k].double()).abs().max().item() for k in b if k in a}


def assert_within_noise(run, ref, noise_run, what):
    """run, ref, noise_run: (losses [steps, 4], student, teacher). Returns the measured errors."""
    losses, student, teacher = run
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


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp2_equals_one_process_on_the_same_global_batch(world, reference):
    ref, noise = reference[world]
    run = run_distributed(_scale_run, world_size=world, args=([],))[0]
    assert len(run[0]) == STEPS and torch.isfinite(run[0]).all()
    assert (noise[0] - ref[0]).abs().max() > 0  # the reordering does change the rounding: the noise is measured
    report = assert_within_noise(run, ref, noise, f"{world} processes")
    print(f"\n{world} processes vs 1: {report}")
