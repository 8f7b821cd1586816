"""Dense evaluation on the patch grid: the linear segmentation probe and mIoU, `dense_probe` (the version to trust on
small data: patch-grid targets, class-balanced loss, a sweep validated on held-out images, per-class IoU, next to
`majority_baseline` and a raw-pixel probe `patchify`), and the label-free patch-similarity agreement (ROC AUC over
patch pairs)."""
import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm  # a text bar: in a notebook a widget bar would leave an empty box in the built book

from dinolite.eval.linear import head_from, train_linear_sweep
from dinolite.eval.retrieval import average_precision
from dinolite.models import check_image_size


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None = 255) -> torch.Tensor:
    """conf[i, j] = number of pixels of true class i predicted as j; pixels == ignore_index skipped."""
    pred, target = torch.as_tensor(pred).flatten().long(), torch.as_tensor(target).flatten().long()
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same number of pixels, got {pred.numel()} and {target.numel()}")
    keep = target != ignore_index if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
    pred, target = pred[keep], target[keep]
    if target.numel() and (target.min() < 0 or target.max() >= num_classes):
        raise ValueError(f"target classes must be in [0, {num_classes}) or ignore_index={ignore_index}")
    if pred.numel() and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"predicted classes must be in [0, {num_classes})")
    return torch.bincount(target * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)


def miou_from_confusion(conf: torch.Tensor) -> dict:
    """IoU_c = TP / (TP + FP + FN) per class; mIoU averages classes that occur in target or prediction.

    Returns dict(miou (percent), iou [C] (fraction, nan for absent classes), pixel_accuracy (percent)).
    """
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
    return {
        "miou": 100.0 * iou.nanmean().item(),
        "iou": iou.float(),
        "pixel_accuracy": 100.0 * (tp.sum() / conf.sum().clamp_min(1)).item(),
    }


def dense_logits(head: torch.nn.Module, patch: torch.Tensor, size) -> torch.Tensor:
    """Patch tokens [N, h, w, D] -> linear head -> [N, C, h, w] -> bilinear upsampling to size (H, W)."""
    logits = head(patch).permute(0, 3, 1, 2)
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def _dense_predict(head, patch, size, batch_size):
    with torch.no_grad():
        return torch.cat([dense_logits(head, patch[i : i + batch_size], size).argmax(1) for i in range(0, patch.shape[0], batch_size)])


def check_patches_and_masks(train_patch, train_masks, test_patch, test_masks) -> None:
    """The dense probes' inputs: patch features [N, h, w, D] and masks [N, H, W] with the same N, per split."""
    for name, patch, masks in (("train", train_patch, train_masks), ("test", test_patch, test_masks)):
        if patch.ndim != 4 or masks.ndim != 3 or patch.shape[0] != masks.shape[0]:
            raise ValueError(f"{name}_patch must be [N, h, w, D] and {name}_masks [N, H, W] with the same N, "
                             f"got {tuple(patch.shape)} and {tuple(masks.shape)}")


def _score(pred: torch.Tensor, masks: torch.Tensor, num_classes: int, ignore_index, head) -> dict:
    """A dense probe's result: mIoU, per-class IoU, pixel accuracy, the confusion matrix, and the fitted head."""
    conf = confusion_matrix(pred, masks, num_classes, ignore_index)
    return {**miou_from_confusion(conf), "confusion": conf, "head": head}


def dense_linear_probe(
    train_patch: torch.Tensor,
    train_masks: torch.Tensor,
    test_patch: torch.Tensor,
    test_masks: torch.Tensor,
    num_classes: int,
    ignore_index: int | None = 255,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    epochs: int = 30,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """A linear layer on frozen patch tokens predicting per-pixel classes; mIoU on the test set.

    train_patch [N, h, w, D] (from extract_features(..., patch_tokens=True)), train_masks
    [N, H, W] long class ids (ignore_index = not labelled). Logits are upsampled bilinearly
    from the patch grid to the mask resolution before the per-pixel cross-entropy (as in the
    DINOv2/DINOv3 linear segmentation evaluation). Patch features are standardised with
    training statistics. AdamW, mini-batches, cosine schedule.
    Returns dict(miou, iou, pixel_accuracy, confusion, head).
    """
    check_patches_and_masks(train_patch, train_masks, test_patch, test_masks)
    x, xt = train_patch.float().cpu(), test_patch.float().cpu()
    y, yt = train_masks.long().cpu(), test_masks.long().cpu()
    mean, std = x.flatten(0, 2).mean(0), x.flatten(0, 2).std(0).clamp_min(1e-6)
    x, xt = (x - mean) / std, (xt - mean) / std
    generator = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(x.shape[-1], num_classes)
    with torch.no_grad():
        linear.weight.normal_(0, 0.01, generator=generator)
        linear.bias.zero_()
    optimizer = torch.optim.AdamW(linear.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(x.shape[0] / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    size = y.shape[-2:]
    ignore = -100 if ignore_index is None else ignore_index
    for _ in tqdm(range(epochs), desc="dense probe", disable=not progress):
        order = torch.randperm(x.shape[0], generator=generator)
        for start in range(0, x.shape[0], batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(dense_logits(linear, x[idx], size), y[idx], ignore_index=ignore)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    pred = _dense_predict(linear, xt, yt.shape[-2:], batch_size)
    return _score(pred, yt, num_classes, ignore_index, torch.nn.Sequential(_Standardize(mean, std), linear))


class _Standardize(torch.nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x):
        return (x - self.mean) / self.std


# ---------------------------------------------------------------------------------------------
# Dense evaluation on the patch grid: a probe you can trust, its baselines, and a label-free metric
# ---------------------------------------------------------------------------------------------
def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Images [N, C, H, W] -> raw patch pixels [N, h, w, C*p*p]: the features of the raw-pixel baseline.

    A linear probe on these is what a dense probe must beat: it can only use each patch's own colours.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
    N, C, H, W = images.shape
    check_image_size(H, W, patch_size)
    h, w = H // patch_size, W // patch_size
    x = images.reshape(N, C, h, patch_size, w, patch_size)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(N, h, w, C * patch_size * patch_size)


def masks_to_patches(masks: torch.Tensor, grid, num_classes: int, ignore_index: int | None = 255):
    """Per-pixel masks [N, H, W] -> (majority class [N, h, w], purity [N, h, w]) on an h x w patch grid.

    purity is the fraction of a cell's labelled pixels that have the majority class (1 inside an
    object, lower on its outline). A cell with no labelled pixel gets ignore_index and purity 0.
    H and W must be multiples of h and w (each cell is one patch).
    """
    masks = torch.as_tensor(masks).long()
    if masks.ndim != 3:
        raise ValueError(f"masks must be [N, H, W], got shape {tuple(masks.shape)}")
    N, H, W = masks.shape
    h, w = grid
    if H % h or W % w:
        raise ValueError(f"a {H} x {W} mask does not split into a {h} x {w} grid of whole patches")
    labelled = masks != ignore_index if ignore_index is not None else torch.ones_like(masks, dtype=torch.bool)
    if ((masks[labelled] < 0) | (masks[labelled] >= num_classes)).any():
        raise ValueError(f"mask classes must be in [0, {num_classes}) or ignore_index={ignore_index}")
    one_hot = F.one_hot(torch.where(labelled, masks, 0), num_classes) * labelled[..., None]
    counts = one_hot.reshape(N, h, H // h, w, W // w, num_classes).sum(dim=(2, 4))  # [N, h, w, C]
    top, labels = counts.max(dim=-1)  # ties: the lowest class id
    total = counts.sum(-1)
    purity = top.float() / total.clamp_min(1)
    if ignore_index is not None:
        labels = torch.where(total > 0, labels, torch.full_like(labels, ignore_index))
    return labels, purity


def class_balanced_weights(labels: torch.Tensor, num_classes: int, ignore_index: int | None = 255) -> torch.Tensor:
    """Cross-entropy weights [C] that give every class present the same total weight.

    w_c = n / (K n_c) for the K classes with n_c > 0 labelled items (0 for absent classes), so that
    the weights average to 1 over the items. Without them a probe on figure-ground data, where the
    background is ~80% of the pixels, learns "background everywhere" and scores the majority baseline.
    """
    labels = torch.as_tensor(labels).flatten().long()
    if ignore_index is not None:
        labels = labels[labels != ignore_index]
    counts = torch.bincount(labels, minlength=num_classes).double()
    present = counts > 0
    weights = torch.where(present, counts.sum() / (present.sum() * counts.clamp_min(1)), torch.zeros_like(counts))
    return weights.float()


def majority_baseline(train_masks: torch.Tensor, test_masks: torch.Tensor, num_classes: int,
                      ignore_index: int | None = 255) -> dict:
    """Predict the most frequent training class at every test pixel: the score a probe that learned
    nothing reaches. Returns miou_from_confusion's dict plus confusion and the class predicted."""
    train_masks, test_masks = torch.as_tensor(train_masks).long(), torch.as_tensor(test_masks).long()
    labelled = train_masks[train_masks != ignore_index] if ignore_index is not None else train_masks.flatten()
    majority = int(torch.bincount(labelled.flatten(), minlength=num_classes).argmax())
    conf = confusion_matrix(torch.full_like(test_masks, majority), test_masks, num_classes, ignore_index)
    return {**miou_from_confusion(conf), "confusion": conf, "majority_class": majority}


def _rows_of_images(patch, labels, purity, min_purity, ignore_index):
    """Flatten patch features [n, h, w, D] and their grid labels to the rows a probe trains on."""
    keep = purity.flatten() >= min_purity
    if ignore_index is not None:
        keep &= labels.flatten() != ignore_index
    return patch.flatten(0, 2)[keep], labels.flatten()[keep]


def _predict_pixels(weight, bias, mean, std, patch, size, batch_size=256):
    """Standardise, apply the linear map, upsample logits bilinearly to size, argmax: [N, H, W]."""
    head = torch.nn.Sequential(_Standardize(mean, std), head_from(weight, bias))
    return _dense_predict(head, patch, size, batch_size)


def dense_probe(
    train_patch: torch.Tensor,
    train_masks: torch.Tensor,
    test_patch: torch.Tensor,
    test_masks: torch.Tensor,
    num_classes: int,
    ignore_index: int | None = 255,
    min_purity: float = 0.0,
    lrs=(1e-2, 1e-1),
    weight_decays=(0.0,),
    class_weights=("none", "balanced"),
    standardize: bool = True,
    epochs: int = 150,
    val_fraction: float = 0.2,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """A dense linear probe that can be trusted: per-class IoU at pixel resolution, baselines beaten.

    train_patch [N, h, w, D] patch features (or `patchify` pixels), train_masks [N, H, W] class ids.
    Training happens on the patch grid: each patch's target is the majority class of its pixels
    (`masks_to_patches`; with min_purity > 0 only patches at least that pure), the features are
    standardised with training statistics (unless standardize=False), and every (lr, weight decay,
    class weighting) triple trains full-batch with AdamW and a cosine schedule for `epochs` steps
    (`_train_linear_sweep`).
    class_weights: "none" (plain cross-entropy) and/or "balanced" (`class_balanced_weights`).
    The triple with the best mIoU on held-out TRAINING IMAGES (val_fraction of them, so that no
    patch of a validation image is fitted) is retrained on all training images. Sweeping the
    weighting matters: balanced weights rescue the rare classes when the features carry them, but
    with features that carry nothing they trade background for false positives and score below
    the majority baseline, which the unweighted probe reaches. Test logits are upsampled
    bilinearly from the patch grid to the mask size and scored per pixel.

    Returns dict(miou (percent, over classes present in the test target or prediction), iou [C]
    (fraction, nan when absent), pixel_accuracy, confusion, head (standardise + linear, on
    [..., D] features), lr, weight_decay, class_weights, val_miou, sweep {(lr, wd, weighting):
    val mIoU}).
    """
    for weighting in class_weights:
        if weighting not in ("none", "balanced"):
            raise ValueError(f"class_weights entries must be 'none' or 'balanced', got {weighting!r}")
    check_patches_and_masks(train_patch, train_masks, test_patch, test_masks)
    if train_patch.shape[1:] != test_patch.shape[1:]:
        raise ValueError(f"train and test patch features differ in grid or dim: {tuple(train_patch.shape[1:])} "
                         f"vs {tuple(test_patch.shape[1:])}")
    if not 0 < val_fraction < 1 or train_patch.shape[0] < 2:
        raise ValueError(f"need >= 2 training images and val_fraction in (0, 1), got {train_patch.shape[0]} "
                         f"images and {val_fraction}")
    x, xt = train_patch.detach().float().cpu(), test_patch.detach().float().cpu()
    y, yt = torch.as_tensor(train_masks).long().cpu(), torch.as_tensor(test_masks).long().cpu()
    grid = tuple(x.shape[1:3])
    labels, purity = masks_to_patches(y, grid, num_classes, ignore_index)

    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(val_fraction * x.shape[0])))
    val_idx, fit_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
    pairs = [(lr, wd) for lr in lrs for wd in weight_decays]

    def fit(images, pairs, weighting):
        rows, targets = _rows_of_images(x[images], labels[images], purity[images], min_purity, ignore_index)
        if rows.shape[0] == 0:
            raise ValueError(f"no training patch is labelled and at least {min_purity} pure")
        mean, std = rows.mean(0), rows.std(0).clamp_min(1e-6)
        if not standardize:
            mean, std = torch.zeros_like(mean), torch.ones_like(std)
        weights = class_balanced_weights(targets, num_classes, None) if weighting == "balanced" else None
        W, b = train_linear_sweep((rows - mean) / std, targets, num_classes, [p[0] for p in pairs],
                                   [p[1] for p in pairs], epochs, seed, progress, class_weights=weights)
        return W, b, mean, std

    sweep = {}
    for weighting in class_weights:
        W, b, mean, std = fit(fit_idx, pairs, weighting)
        for i, (lr, wd) in enumerate(pairs):
            pred = _predict_pixels(W[i], b[i], mean, std, x[val_idx], y.shape[-2:])
            conf = confusion_matrix(pred, y[val_idx], num_classes, ignore_index)
            sweep[(lr, wd, weighting)] = miou_from_confusion(conf)["miou"]
    (lr, wd, weighting), val_miou = max(sweep.items(), key=lambda item: item[1])  # first best on ties
    W, b, mean, std = fit(torch.arange(x.shape[0]), [(lr, wd)], weighting)
    pred = _predict_pixels(W[0], b[0], mean, std, xt, yt.shape[-2:])
    head = torch.nn.Sequential(_Standardize(mean, std), head_from(W[0], b[0]))
    return {**_score(pred, yt, num_classes, ignore_index, head), "lr": lr, "weight_decay": wd,
            "class_weights": weighting, "val_miou": val_miou, "sweep": sweep}


def roc_auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve: P(score of a random positive > that of a random negative), ties 1/2.

    Computed from average ranks (Mann-Whitney U). nan without positives or without negatives.
    """
    scores, positive = torch.as_tensor(scores).flatten().double(), torch.as_tensor(positive).flatten().bool()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = scores.argsort()
    sorted_scores = scores[order]
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    last_rank = counts.cumsum(0).double()  # 1-based rank of each tie group's last member
    average_rank = last_rank - (counts.double() - 1) / 2
    ranks = torch.empty_like(scores)
    ranks[order] = average_rank[inverse]
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2
    return (u / (n_pos * n_neg)).item()


def patch_similarity_agreement(patch: torch.Tensor, masks: torch.Tensor, num_classes: int,
                               ignore_index: int | None = 255, min_purity: float = 0.75, pairs: str = "within",
                               max_pairs: int = 200_000, seed: int = 0) -> dict:
    """Label-free dense metric: does patch-feature cosine similarity tell which patches share a segment?

    patch [N, h, w, D]; masks [N, H, W] segment ids per pixel (on SyntheticShapes: 0 background,
    class + 1 on the shape; set a class to ignore_index to leave it out). Only patches whose cells
    are at least min_purity pure (`masks_to_patches`) take part. Nothing is fitted: the score is the
    ROC AUC (`roc_auc`) and the average precision of the pairs' cosine similarity for "same label".

    pairs="within": all pairs of patches of one image, scored per image and averaged over the
        images that have both kinds of pair (grouping: is the object one cluster, apart from the
        background?). Colour alone already does well here: compare with the raw-pixel baseline.
    pairs="across": max_pairs random pairs of patches from two different images (semantics: are
        patches of the same class alike in different images, whatever their colours?).
    1.0: every same-label pair is more similar than every other pair; 0.5: chance.

    Returns dict(auc, ap, positive_rate (fraction of same-label pairs: the AP of a chance ranking),
    images (images scored; "across": images with a patch taking part), pairs (pairs scored)).
    """
    if patch.ndim != 4 or masks.ndim != 3 or patch.shape[0] != masks.shape[0]:
        raise ValueError(f"patch must be [N, h, w, D] and masks [N, H, W] with the same N, got "
                         f"{tuple(patch.shape)} and {tuple(masks.shape)}")
    if pairs not in ("within", "across"):
        raise ValueError(f"pairs must be 'within' or 'across', got {pairs!r}")
    labels, purity = masks_to_patches(masks, tuple(patch.shape[1:3]), num_classes, ignore_index)
    features = F.normalize(patch.detach().double().cpu().flatten(1, 2), dim=-1)  # [N, P, D]
    labels, keep = labels.flatten(1), purity.flatten(1) >= min_purity
    if ignore_index is not None:
        keep &= labels != ignore_index
    if pairs == "across":
        image_of = torch.arange(labels.shape[0])[:, None].expand_as(labels)[keep]
        f, lab = features[keep], labels[keep]
        g = torch.Generator().manual_seed(seed)
        i, j = torch.randint(len(lab), (max_pairs,), generator=g), torch.randint(len(lab), (max_pairs,), generator=g)
        other = image_of[i] != image_of[j]
        i, j = i[other], j[other]
        same = lab[i] == lab[j]
        if len(same) == 0 or same.all() or not same.any():
            raise ValueError("the patches taking part do not form pairs of both kinds (same and different label)")
        similarity = (f[i] * f[j]).sum(-1)
        ranked = same[similarity.argsort(descending=True, stable=True)]
        return {"auc": roc_auc(similarity, same), "ap": average_precision(ranked),
                "positive_rate": same.double().mean().item(), "images": int(image_of.unique().numel()),
                "pairs": int(len(same))}
    aucs, aps, rates, count = [], [], [], 0
    for f, lab, k in zip(features, labels, keep):
        f, lab = f[k], lab[k]
        i, j = torch.triu_indices(len(lab), len(lab), offset=1)
        same = lab[i] == lab[j]
        if len(same) == 0 or same.all() or not same.any():
            continue
        similarity = (f[i] * f[j]).sum(-1)
        aucs.append(roc_auc(similarity, same))
        aps.append(average_precision(same[similarity.argsort(descending=True, stable=True)]))
        rates.append(same.double().mean().item())
        count += len(same)
    if not aucs:
        raise ValueError("no image has pure patches of two segments; lower min_purity or use a finer patch grid")
    return {"auc": float(np.mean(aucs)), "ap": float(np.mean(aps)), "positive_rate": float(np.mean(rates)),
            "images": len(aucs), "pairs": count}
