"""DINOv3 high-resolution adaptation: mixed crop sizes drawn per step (the same on every rank), a constant Gram
weight and local-crop DINO weight 0.5; the tiny CPU recipe and the 7B recipe with the official values."""
from collections import Counter

import pytest
import torch

from dinolite.checkpoint import CheckpointError, latest_checkpoint
from dinolite.data import SyntheticShapes
from dinolite.train import apply_overrides, get_config
from dinolite.train.config import parse_size_pairs
from dinolite.train.data import StepBatches, crop_sizes_at
from dinolite.train.optim import gram_values, schedule_values

from tests.distributed_utils import run_distributed
from tests.test_train import MICRO, _run, micro_config


def test_each_step_draws_one_pair_with_the_given_probabilities():
    cfg = apply_overrides(get_config("tiny-cpu"), ["crops.size_pairs=32:16:0.2,48:24:0.8"])
    counts = Counter(crop_sizes_at(cfg, step) for step in range(2000))
    assert set(counts) == {(32, 16), (48, 24)}
    assert counts[(48, 24)] / 2000 == pytest.approx(0.8, abs=0.04)  # binomial sd 0.009
    assert [crop_sizes_at(cfg, s) for s in range(50)] == [crop_sizes_at(cfg, s) for s in range(50)]  # a function of the step
    other_seed = apply_overrides(cfg, ["train.seed=1"])
    assert [crop_sizes_at(cfg, s) for s in range(50)] != [crop_sizes_at(other_seed, s) for s in range(50)]
    assert crop_sizes_at(get_config("tiny-cpu"), 7) == (32, 16)  # no pairs: the fixed sizes


def test_bad_size_pairs_are_clear_errors():
    with pytest.raises(ValueError, match="'32x16' is not GLOBAL:LOCAL:PROBABILITY"):
        apply_overrides(get_config("tiny-cpu"), ["crops.size_pairs=32x16"])
    with pytest.raises(ValueError, match="36:16 are not both multiples of model.patch_size=8"):
        apply_overrides(get_config("tiny-cpu"), ["crops.size_pairs=36:16:1"])


def _sizes_on_rank(rank, world_size):
    import torch.distributed as dist

    cfg = apply_overrides(get_config("dinov3-tiny-cpu-highres"), ["train.batch_size=4", "crops.n_local=1"])
    batches = StepBatches(SyntheticShapes(16, 32), cfg, total_steps=12, rank=rank, world_size=world_size)
    sizes = torch.tensor([[batches[s]["global_crops"].shape[-1], batches[s]["local_crops"].shape[-1],
                           batches[s]["gram_crops"].shape[-1], batches[s]["masks"].shape[-1]] for s in range(12)])
    gathered = [torch.zeros_like(sizes) for _ in range(world_size)]
    dist.all_gather(gathered, sizes)
    return {"sizes": sizes, "gathered": gathered, "first_image": batches[0]["global_crops"][0]}


def test_every_rank_trains_at_the_same_size_each_step():
    results = run_distributed(_sizes_on_rank, world_size=2)
    a, b = results[0]["sizes"], results[1]["sizes"]
    assert torch.equal(a, b) and torch.equal(results[0]["gathered"][1], a)
    assert set(a[:, 0].tolist()) == {32, 48}  # both resolutions occur in 12 steps
    for global_size, local_size, gram_size, patches in a.tolist():
        assert local_size == global_size // 2 and gram_size == 1.5 * global_size and patches == (global_size // 8) ** 2
    assert not torch.equal(results[0]["first_image"], results[1]["first_image"])  # the ranks see other images


def test_vit7b_highres_recipe_has_the_official_values():
    """dinov3_vit7b16_high_res_adapt.yaml (line numbers in the recipe's docstring)."""
    cfg = get_config("dinov3-vit7b16-highres")
    pairs = parse_size_pairs(cfg.crops.size_pairs)
    # :162-179 pairs and ratios; 768:168 -> 768:160 (the same 10 x 10 tokens: the official conv drops 8 px)
    assert pairs == [(512, 112, 0.3), (768, 112, 0.3), (768, 160, 0.3), (768, 224, 0.05), (768, 336, 0.05)]
    # :180-185 Gram crops 768 at 512 and 1152 at 768
    assert {g: g * cfg.gram.teacher_scale for g, _, _ in pairs} == {512: 768, 768: 1152}
    # :70 batch 8 per GPU; :136 + :75 a fresh 30-epoch run of 1000 iterations (started with init_from at step 0)
    assert cfg.train.batch_size == 8 and cfg.total_steps == 30_000
    # :63-68 Gram 1.5 constant, :24-30 local DINO 0.5, :52 rep_update false (never refreshed)
    for step in (0, 15_000, cfg.total_steps - 1):
        assert gram_values(cfg, step, cfg.total_steps, cfg.train.epoch_length) == dict(gram_weight=1.5,
                                                                                      local_dino_weight=0.5)
    assert cfg.gram.update_every == 0
    # :203-209 lr: cosine 0 -> 1.25e-5 x 4 sqrt(B / 1024) over 10 epochs (both ends included), then flat;
    # at 256 GPUs x 8 = 2048: peak 1.25e-5 x 4 x sqrt(2) = 7.07e-5; the middle of the rise (j = 4999.5) is half.
    peak = 1.25e-5 * 4 * 2 ** 0.5
    lr = [schedule_values(cfg, s, cfg.total_steps, 1000, 2048).lr for s in (0, 9_999, 10_000, 29_999)]
    assert lr == pytest.approx([0.0, peak, peak, peak], rel=1e-12)
    mid = [schedule_values(cfg, s, cfg.total_steps, 1000, 2048).lr for s in (4_999, 5_000)]
    assert sum(mid) / 2 == pytest.approx(peak / 2, rel=1e-6)
    # :215-224 teacher temperature 0.07 and momentum 0.999 constant; :208 the last layer is never frozen
    v = schedule_values(cfg, 0, cfg.total_steps, 1000, 2048)
    assert (v.teacher_temp, v.momentum, v.last_layer_lr) == (0.07, pytest.approx(0.999), 0.0)
    assert schedule_values(cfg, 1, cfg.total_steps, 1000, 2048).last_layer_lr > 0
    assert cfg.model.embed_dim == 4096 and cfg.model.patch_size == 16 and cfg.model.pos_embed == "rope"


def test_weights_only_start_takes_the_teacher_at_step_0_with_a_fresh_optimiser(tmp_path):
    """init_from: the official student.resume_from_teacher_chkpt (ssl_meta_arch.py:328-337) loads the teacher's
    weights into the student and the EMA teacher; the run starts at iteration 0 with a fresh AdamW."""
    base = tmp_path / "base"
    _run(micro_config(), base)
    source = torch.load(latest_checkpoint(str(base)), weights_only=False)
    started = _run(micro_config("train.epochs=3"), tmp_path / "stage", init_from=str(base), stop_at_step=0)
    assert started.completed_steps == 0
    for part in (started.student, started.teacher):
        assert all(torch.equal(v, source["teacher"][k]) for k, v in part.state_dict().items())
    stage = _run(micro_config("train.epochs=3"), tmp_path / "stage2", init_from=f"{base}@4")
    assert [r["step"] for r in stage.history if "loss" in r] == list(range(1, 10))  # 9 steps from 0, not from 4
    with pytest.raises(CheckpointError, match="either continue_from"):
        _run(micro_config(), tmp_path / "both", init_from=str(base), continue_from=str(base))


def test_tiny_highres_recipe_scales_the_same_choices_down():
    cfg = get_config("dinov3-tiny-cpu-highres")
    pairs = parse_size_pairs(cfg.crops.size_pairs)
    assert [(g, l) for g, l, _ in pairs] == [(32, 16), (48, 24)]
    assert cfg.gram.teacher_scale == 1.5 and cfg.gram.weight == 1.5 and cfg.gram.local_dino_weight == 0.5
    assert {tuple(gram_values(cfg, s, cfg.total_steps, 25).values()) for s in range(cfg.total_steps)} == {(1.5, 0.5)}


def test_mixed_size_training_with_a_gram_teacher_runs(tmp_path):
    base = tmp_path / "base"
    _run(micro_config(), base)
    cfg = micro_config("crops.size_pairs=32:16:0.5,48:24:0.5", f"gram.teacher={base}", "gram.weight=1.5",
                       "gram.teacher_scale=1.5", "gram.local_dino_weight=0.5", "train.epochs=3")
    arch = _run(cfg, tmp_path / "highres", continue_from=str(base))
    steps = [r for r in arch.history if "gram" in r]
    assert len(steps) == 3 and all(r["gram_weight"] == 1.5 and r["local_dino_weight"] == 0.5 for r in steps)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
