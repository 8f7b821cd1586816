"""DINOv3 high-resolution adaptation: mixed crop sizes drawn per step (the same on every rank), a constant Gram
weight and local-crop DINO weight 0.5; the tiny CPU recipe and the 7B recipe with the official values."""
from collections import Counter

import pytest
import torch

from dinolite.data import SyntheticShapes
from dinolite.train import apply_overrides, get_config
from dinolite.train.config import parse_size_pairs
from dinolite.train.data import StepBatches, crop_sizes_at
from dinolite.train.optim import gram_values

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
    cfg = get_config("dinov3-vit7b16-highres")
    pairs = parse_size_pairs(cfg.crops.size_pairs)
    assert {g for g, _, _ in pairs} == {512, 768}
    assert min(l for _, l, _ in pairs) == 112 and max(l for _, l, _ in pairs) == 336
    assert sum(p for _, _, p in pairs) == pytest.approx(1.0)
    assert cfg.gram.teacher_scale == 1.5 and cfg.gram.weight == 1.5
    gram_stage_end = get_config("dinov3-vit7b16-gram").total_steps
    assert gram_stage_end == 1_200_000 and cfg.total_steps - gram_stage_end == 30_000
    for step in (gram_stage_end, gram_stage_end + 15_000, cfg.total_steps - 1):  # constant through the stage
        assert gram_values(cfg, step, cfg.total_steps, cfg.train.epoch_length) == dict(gram_weight=1.5,
                                                                                      local_dino_weight=0.5)
    assert cfg.model.embed_dim == 4096 and cfg.model.patch_size == 16 and cfg.model.pos_embed == "rope"


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
