import math

import pytest
import torch

from dinolite.masking import MaskingGenerator, collate_multicrop


def test_block_shapes_follow_area_and_aspect_bounds():
    # A large grid and large blocks make rounding negligible, so the continuous bounds apply.
    gen = MaskingGenerator(200, min_num_patches=400, min_aspect=0.3, generator=0)
    blocks = [gen.draw_block(max_block=2000) for _ in range(2000)]
    blocks = [b for b in blocks if b is not None]
    assert len(blocks) == 2000  # such blocks always fit a 200 x 200 grid
    aspects = torch.tensor([h / w for _, _, h, w in blocks])
    areas = torch.tensor([h * w for _, _, h, w in blocks], dtype=torch.float64)
    assert aspects.min() >= 0.3 * 0.93 and aspects.max() <= (1 / 0.3) * 1.07
    assert areas.min() >= 400 * 0.9 and areas.max() <= 2000 * 1.1
    # log-uniform aspect: log(h/w) symmetric around 0, spread over [log .3, log 1/.3]
    log_aspect = aspects.log()
    assert abs(log_aspect.mean().item()) < 0.05
    assert abs((log_aspect.abs() > math.log(1 / 0.3) / 2).float().mean().item() - 0.5) < 0.05
    # uniform area in [400, 2000]: mean 1200
    assert abs(areas.mean().item() - 1200) < 40
    for top, left, h, w in blocks[:200]:
        assert 0 <= top <= 200 - h and 0 <= left <= 200 - w


def test_one_block_is_a_rectangle():
    gen = MaskingGenerator(14, generator=1)
    for _ in range(50):
        mask = torch.zeros(14, 14, dtype=torch.bool).numpy()
        added = gen._add_block(mask, max_block=30)
        rows, cols = mask.any(1).nonzero()[0], mask.any(0).nonzero()[0]
        assert added == mask.sum() > 0 and added <= 30
        assert mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5])
def test_masked_count_never_above_target_and_close_to_it(ratio):
    gen = MaskingGenerator(16, generator=2)
    target = int(256 * ratio)
    counts = torch.tensor([gen(target).sum().item() for _ in range(200)], dtype=torch.float)
    assert counts.max() <= target
    assert counts.min() >= 0.8 * target
    assert counts.mean() >= 0.98 * target  # the block algorithm almost always reaches the target


def test_complete_reaches_exact_target():
    gen = MaskingGenerator((12, 16), generator=3)
    for target in [0, 1, 3, 17, 60, 96, 150, 192]:
        mask = gen(target, complete=True)
        assert mask.shape == (12, 16) and mask.dtype == torch.bool
        assert mask.sum().item() == target


def test_max_num_patches_limits_each_block():
    gen = MaskingGenerator(16, max_num_patches=10, generator=4)
    mask = torch.zeros(16, 16, dtype=torch.bool).numpy()
    for _ in range(100):
        assert gen._add_block(mask.copy(), max_block=10) <= 10
    assert gen(0).sum() == 0


def test_seeded_generators_are_deterministic():
    a = MaskingGenerator(16, generator=7)(80)
    b = MaskingGenerator(16, generator=7)(80)
    c = MaskingGenerator(16, generator=8)(80)
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(0)
    d = MaskingGenerator(16)(80)
    torch.manual_seed(0)
    assert torch.equal(d, MaskingGenerator(16)(80))


def test_bad_arguments():
    with pytest.raises(ValueError, match="outside"):
        MaskingGenerator(4)(17)
    with pytest.raises(ValueError, match="aspect"):
        MaskingGenerator(4, min_aspect=2.0, max_aspect=1.0)


def make_samples(batch_size, n_local=3, global_size=64, local_size=32, labels=True):
    samples = []
    for b in range(batch_size):
        crops = dict(global_crops=[torch.full((3, global_size, global_size), 10.0 * b + c) for c in range(2)],
                     local_crops=[torch.full((3, local_size, local_size), 100.0 + 10 * b + c) for c in range(n_local)])
        samples.append((crops, b % 3) if labels else crops)
    return samples


def test_collate_stacks_crop_major_and_casts():
    batch_size = 5
    out = collate_multicrop(make_samples(batch_size), MaskingGenerator(16, generator=0), patch_size=4,
                            dtype=torch.bfloat16, generator=0)
    g, l = out["global_crops"], out["local_crops"]
    assert g.shape == (10, 3, 64, 64) and g.dtype == torch.bfloat16
    assert l.shape == (15, 3, 32, 32) and l.dtype == torch.bfloat16
    for c in range(2):
        for b in range(batch_size):
            assert g[c * batch_size + b, 0, 0, 0].item() == 10 * b + c
    for c in range(3):
        for b in range(batch_size):
            assert l[c * batch_size + b, 0, 0, 0].item() == 100 + 10 * b + c
    assert out["labels"].tolist() == [0, 1, 2, 0, 1]
    no_labels = collate_multicrop(make_samples(2, n_local=0, labels=False), MaskingGenerator(16), patch_size=4)
    assert "labels" not in no_labels and no_labels["local_crops"] is None


@pytest.mark.parametrize("ratio_mode", ["uniform", "upper"])
def test_collate_mask_fields_are_consistent(ratio_mode):
    batch_size, n_tokens = 6, 256
    gen = MaskingGenerator(16, generator=1)
    edges = torch.linspace(0.1, 0.5, 6 + 1).tolist()
    for step in range(20):
        out = collate_multicrop(make_samples(batch_size), gen, patch_size=4, ratio_mode=ratio_mode,
                                complete_masks=True, generator=step)
        masks = out["masks"]
        assert masks.shape == (12, n_tokens) and masks.dtype == torch.bool
        assert torch.equal(out["mask_indices"], masks.flatten().nonzero().flatten())
        assert out["n_masked_patches"].item() == len(out["mask_indices"]) == masks.sum().item()
        counts = masks.sum(1)
        assert (counts > 0).sum().item() == int(12 * 0.5)
        # weights: 1/count of the image, summing to 1 per masked image
        image_of = out["mask_indices"] // n_tokens
        per_image = torch.zeros(12).index_add_(0, image_of, out["masks_weight"])
        assert torch.allclose(per_image[counts > 0], torch.ones(6))
        assert torch.allclose(out["masks_weight"], 1.0 / counts[image_of].float())
        # sorted masked counts fall in the linspace bins (exactly the upper edge for DINOv3)
        sorted_counts = counts[counts > 0].sort().values.tolist()
        for i, count in enumerate(sorted_counts):
            if ratio_mode == "upper":
                assert count == int(n_tokens * edges[i + 1])
            else:
                assert int(n_tokens * edges[i]) <= count <= int(n_tokens * edges[i + 1])
        assert out["upperbound"] == sum(int(n_tokens * e) for e in edges[1:])
        assert out["n_masked_patches"] <= out["upperbound"]


def test_collate_shuffles_which_crops_are_masked():
    gen = MaskingGenerator(16, generator=0)
    masked_somewhere = torch.zeros(8, dtype=torch.bool)
    empty_somewhere = torch.zeros(8, dtype=torch.bool)
    for step in range(30):
        counts = collate_multicrop(make_samples(4, n_local=0), gen, patch_size=4, generator=step)["masks"].sum(1)
        masked_somewhere |= counts > 0
        empty_somewhere |= counts == 0
    assert masked_somewhere.all() and empty_somewhere.all()


def test_collate_mask_probability_sets_number_of_masked_crops():
    for prob, expected in [(0.0, 0), (0.3, 3), (1.0, 10)]:
        out = collate_multicrop(make_samples(5, n_local=0), MaskingGenerator(16, generator=0), patch_size=4,
                                mask_probability=prob, complete_masks=True)
        assert (out["masks"].sum(1) > 0).sum().item() == expected


def test_collate_rejects_inconsistent_input():
    gen = MaskingGenerator(16)
    samples = make_samples(3)
    samples[1][0]["global_crops"][1] = torch.zeros(3, 48, 48)
    with pytest.raises(ValueError, match="same shape"):
        collate_multicrop(samples, gen, patch_size=4)
    with pytest.raises(ValueError, match="grid"):
        collate_multicrop(make_samples(2), gen, patch_size=8)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        collate_multicrop(make_samples(2), gen, patch_size=5)
    samples = make_samples(2)
    samples[0][0]["local_crops"].pop()
    with pytest.raises(ValueError, match="number of local crops"):
        collate_multicrop(samples, gen, patch_size=4)
    with pytest.raises(ValueError, match="mask_ratio_range"):
        collate_multicrop(make_samples(2), gen, mask_ratio_range=(0.5, 0.1))
    with pytest.raises(TypeError, match="dict"):
        collate_multicrop([torch.zeros(3)], gen)
