"""Dense evaluation: patch-grid targets, class-balanced weights, baselines, the trustworthy dense
probe and the label-free patch-similarity agreement, on hand-made cases with known answers."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from dinolite.eval import (
    class_balanced_weights,
    dense_probe,
    majority_baseline,
    masks_to_patches,
    patch_similarity_agreement,
    patchify,
    roc_auc,
)


def test_patchify_hand_computed():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    out = patchify(images, 2)
    assert out.shape == (2, 2, 2, 12)
    # patch (row 1, col 0) of image 1, channel 2: pixels rows 2-3, cols 0-1
    torch.testing.assert_close(out[1, 1, 0].reshape(3, 2, 2)[2], images[1, 2, 2:4, 0:2])
    with pytest.raises(ValueError, match="multiple"):
        patchify(torch.zeros(1, 3, 5, 4), 2)


def test_masks_to_patches_majority_purity_ignore_and_ties():
    mask = torch.tensor([[[0, 0, 1, 1],
                          [0, 1, 1, 1],
                          [2, 2, 255, 255],
                          [0, 1, 255, 255]]])
    labels, purity = masks_to_patches(mask, (2, 2), num_classes=3)
    assert labels.tolist() == [[[0, 1], [2, 255]]]  # bottom-left: 2 twice, 0 and 1 once
    torch.testing.assert_close(purity, torch.tensor([[[0.75, 1.0], [0.5, 0.0]]]))
    tie = torch.tensor([[[1, 0], [0, 1]]])
    assert masks_to_patches(tie, (1, 1), num_classes=2)[0].item() == 0  # ties: the lowest class id
    with pytest.raises(ValueError, match="classes must be in"):
        masks_to_patches(torch.full((1, 2, 2), 3), (1, 1), num_classes=3)
    with pytest.raises(ValueError, match="grid"):
        masks_to_patches(torch.zeros(1, 5, 4, dtype=torch.long), (2, 2), num_classes=3)


def test_class_balanced_weights_hand_computed():
    w = class_balanced_weights(torch.tensor([0, 0, 0, 1, 255]), num_classes=3)
    torch.testing.assert_close(w, torch.tensor([4 / (2 * 3), 4 / (2 * 1), 0.0]))
    # each present class carries the same total weight, and the weights average to 1 over items
    labels = torch.tensor([0, 0, 0, 1])
    assert w[labels].sum().item() == pytest.approx(4.0)


def test_majority_baseline_hand_computed():
    train = torch.tensor([[[0, 0], [0, 1]]])
    test = torch.tensor([[[0, 1], [1, 1]], [[0, 0], [0, 0]]])  # 5 background, 3 shape pixels
    result = majority_baseline(train, test, num_classes=2)
    assert result["majority_class"] == 0
    assert result["iou"][0].item() == pytest.approx(5 / 8) and result["iou"][1].item() == 0.0
    assert result["miou"] == pytest.approx(100 * (5 / 8) / 2)


def brute_force_auc(scores, positive):
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_roc_auc_hand_computed_and_ties():
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8])
    assert roc_auc(scores, torch.tensor([0, 1, 0, 1])) == 1.0
    assert roc_auc(scores, torch.tensor([0, 0, 1, 1])) == 0.75  # 0.35 loses to 0.4, wins the 3 others
    assert roc_auc(scores, torch.tensor([1, 0, 1, 0])) == 0.0
    assert roc_auc(torch.tensor([1.0, 1.0]), torch.tensor([1, 0])) == 0.5
    assert math.isnan(roc_auc(scores, torch.ones(4)))
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (60,), generator=g).float()  # many ties
    positive = torch.rand(60, generator=g) < 0.3
    assert roc_auc(scores, positive) == pytest.approx(brute_force_auc(scores.tolist(), positive.tolist()), abs=1e-12)


def blob_masks(n, grid, patch, num_classes, seed):
    """Masks whose labels are constant on 2 x 2 blocks of patches: [n, grid*patch, grid*patch] and the
    patch-grid labels [n, grid, grid]; class 0 ("background") is the most frequent."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(1, num_classes, (n, grid // 2, grid // 2), generator=g)
    blocks[torch.rand(n, grid // 2, grid // 2, generator=g) < 0.6] = 0
    grid_labels = blocks.repeat_interleave(2, 1).repeat_interleave(2, 2)
    return grid_labels.repeat_interleave(patch, 1).repeat_interleave(patch, 2), grid_labels


def test_dense_probe_perfect_features_score_about_100_random_features_the_majority_baseline():
    C, grid, p = 3, 8, 4
    masks, grid_labels = blob_masks(160, grid, p, C, seed=0)
    g = torch.Generator().manual_seed(1)
    perfect = F.one_hot(grid_labels, C).float() + 0.05 * torch.randn(160, grid, grid, C, generator=g)
    result = dense_probe(perfect[:100], masks[:100], perfect[100:], masks[100:], C, epochs=100)
    # logits are upsampled bilinearly, so a few pixels at block corners may flip; nothing else may
    assert result["miou"] > 97 and result["pixel_accuracy"] > 98
    assert (result["iou"] > 0.95).all()

    noise = torch.randn(160, grid, grid, 16, generator=g)
    result = dense_probe(noise[:100], masks[:100], noise[100:], masks[100:], C, epochs=100)
    baseline = majority_baseline(masks[:100], masks[100:], C)
    assert result["class_weights"] == "none"  # balanced weights on noise score below the baseline
    assert abs(result["miou"] - baseline["miou"]) < 3
    assert result["iou"][1:].nan_to_num(0).max() < 0.05


def test_dense_probe_balanced_weights_rescue_a_rare_class():
    # class 1 is rare (3% of patches) and readable from one weak feature among noise
    g = torch.Generator().manual_seed(0)
    labels = (torch.rand(200, 4, 4, generator=g) < 0.03).long()
    masks = labels.repeat_interleave(2, 1).repeat_interleave(2, 2)
    features = torch.randn(200, 4, 4, 8, generator=g)
    features[..., 0] += 3.0 * labels
    plain = dense_probe(features[:150], masks[:150], features[150:], masks[150:], 2, class_weights=("none",))
    swept = dense_probe(features[:150], masks[:150], features[150:], masks[150:], 2)
    assert swept["class_weights"] == "balanced"
    assert swept["iou"][1] > plain["iou"][1] + 0.05
    assert set(swept["sweep"]) == {(lr, 0.0, w) for lr in (1e-2, 1e-1) for w in ("none", "balanced")}


def test_dense_probe_rejects_bad_input():
    with pytest.raises(ValueError, match="same N"):
        dense_probe(torch.zeros(2, 2, 2, 4), torch.zeros(3, 4, 4), torch.zeros(2, 2, 2, 4), torch.zeros(2, 4, 4), 2)
    with pytest.raises(ValueError, match="class_weights"):
        dense_probe(torch.zeros(2, 2, 2, 4), torch.zeros(2, 4, 4), torch.zeros(2, 2, 2, 4), torch.zeros(2, 4, 4), 2,
                    class_weights=("inverse",))


def test_patch_similarity_agreement_known_answers():
    C, grid, p = 4, 8, 2
    masks, grid_labels = blob_masks(20, grid, p, C, seed=3)
    g = torch.Generator().manual_seed(0)
    perfect = F.one_hot(grid_labels, C).float()
    for pairs in ("within", "across"):
        result = patch_similarity_agreement(perfect, masks, C, pairs=pairs)
        assert result["auc"] == 1.0 and result["ap"] == pytest.approx(1.0)
    # every patch orthogonal to every other: all similarities tie, exactly chance
    distinct = F.one_hot(torch.arange(grid * grid).reshape(grid, grid), grid * grid).float().expand(20, -1, -1, -1)
    assert patch_similarity_agreement(distinct, masks, C)["auc"] == 0.5
    # same-label pairs opposite (cosine -1), different-label pairs orthogonal (0): the worst ranking
    worst = torch.tensor([[[[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]]])
    assert patch_similarity_agreement(worst, torch.tensor([[[0, 0, 1, 1]]]), 2)["auc"] == 0.0
    noise = torch.randn(20, grid, grid, 64, generator=g)
    result = patch_similarity_agreement(noise, masks, C)
    assert abs(result["auc"] - 0.5) < 0.05
    # hand case: one image, a 1 x 3 grid, labels 0 0 1, similarities s01=1, s02=0, s12=0.6
    mask = torch.tensor([[[0, 0, 1]]])
    feats = torch.tensor([[[[1.0, 0.0], [1.0, 0.0], [0.6, 0.8]]]])
    result = patch_similarity_agreement(feats, mask, 2)
    assert result["auc"] == 1.0 and result["positive_rate"] == pytest.approx(1 / 3) and result["pairs"] == 3
    with pytest.raises(ValueError, match="pairs"):
        patch_similarity_agreement(feats, mask, 2, pairs="all")
