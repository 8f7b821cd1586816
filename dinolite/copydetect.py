"""Copy detection with a descriptor made for copies, not the DINO embedding.

A DINO [CLS] embedding is trained to *ignore* crops and colour changes (chapters 2 and 3), so two
distinct photos of one kind of scene are often closer than a photo and its crop: it cannot tell
copies from look-alikes at any threshold (chapter 12). DINOv2 deduplicated with a dedicated
copy-detection network (SSCD) instead. This module is a small, dependency-free stand-in:

    thumbs = thumbnails("folder:~/photos")            # [N, 32, 32] uint8 grey thumbnails
    views = describe_views(thumbs)                     # 8 x [N, 64]: the image, its mirror, 3 zooms
    kept, groups = find_copies(views, threshold=DEFAULT_THRESHOLD)

The descriptor: the grey image squashed to 32 x 32, averaged down to an 8 x 8 grid, minus its
mean, divided by its norm (64 numbers; cosine similarity compares two of them). Each edit of a
copy is handled by one part of it:
    re-encoding (JPEG) and rescaling change fine detail only: the 8 x 8 grid averages it away;
    brightness and contrast changes scale and shift the grey values: mean and norm remove them;
    mirroring: every image is also searched as its mirror image;
    small crops (resized back) zoom the image: every image is also searched zoomed in by 1, 2
        and 3 pixels of 32 per side (up to 9% of each side), so a crop meets its original
        aligned. An edge links two images when any view of one is close to the other.
Colour is ignored (a grey descriptor), so recolourings are found too; an image with no contrast
at all (a flat colour) has no direction and is never called a copy.

DEFAULT_THRESHOLD was calibrated once on real photographs with calibrate() below, which plants
copies with plant_copies() (`benchmarks/copy_detection.py --photos DIR` reproduces it): 3,000
random Imagenette photos (centre squares at 32 x 32), 100 copies per edit of EDITS. The 1st
percentile of the copies' similarity to their original was 0.978, the 99.5th percentile of
1,000 sampled photos' most similar other photo 0.954; their midpoint is 0.966 (0.971 on another
draw of 3,000 photos), and we use 0.97. With it the default command, on those 3,000 photos plus
the 500 copies, removes 498 images, all of them copies, and finds 97-100% of the copies of each
edit (brightness x1.25 copies, whose clipped highlights lose detail, are the lowest).
`--dedup-threshold auto` repeats the calibration on a sample of the user's own pool.
"""
import io
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps
from tqdm import tqdm

from dinolite import curation

THUMBNAIL_SIZE = 32  # images are squashed (not cropped) to this square before describing
GRID = 8  # the descriptor is a GRID x GRID grey image: 64 numbers
ZOOM_CROPS = (1, 2, 3)  # searched zooms: this many thumbnail pixels cropped off each side, resized back
DEFAULT_THRESHOLD = 0.97  # cosine similarity of copies for this descriptor (calibrated: see the module docstring)
EDITS = ("jpeg", "resize", "brightness", "crop", "mirror")  # the planted edits (plant_copies)


# ---------------------------------------------------------------------------------------------
# Planted copies: for calibration, tests and chapter 12
# ---------------------------------------------------------------------------------------------
def edit_image(image: Image.Image, edit: str) -> Image.Image:
    """A copy of `image` made with one of EDITS (the edits of the planted-copy benchmark):

    jpeg: re-encoded as JPEG at quality 30; resize: down to half size, then back up (bilinear);
    brightness: x1.25 (clipped at white); crop: a border of 1/16 of each side (2 px of 32) cut
    off and the rest resized back; mirror: flipped left to right.
    """
    image = image.convert("RGB")
    w, h = image.size
    if edit == "jpeg":
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=30)
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    if edit == "resize":
        return image.resize((max(1, w // 2), max(1, h // 2)), Image.BILINEAR).resize((w, h), Image.BILINEAR)
    if edit == "brightness":
        return ImageEnhance.Brightness(image).enhance(1.25)
    if edit == "crop":
        dx, dy = max(1, round(w / 16)), max(1, round(h / 16))
        return image.crop((dx, dy, w - dx, h - dy)).resize((w, h), Image.BICUBIC)
    if edit == "mirror":
        return ImageOps.mirror(image)
    raise ValueError(f"unknown edit {edit!r}; choose one of {', '.join(EDITS)}")


def plant_copies(images, per_edit: int, edits=EDITS, seed: int = 0):
    """Copies of randomly chosen images, `per_edit` for each edit (distinct originals across edits).

    Returns (copies: list of PIL images, source [C]: the index into `images` of each copy's
    original, edit [C]: the edit's name).
    """
    n = len(images)
    total = per_edit * len(edits)
    if total > n:
        raise ValueError(f"cannot plant {total} copies of distinct originals in {n} images; lower per_edit")
    originals = np.random.default_rng(seed).choice(n, total, replace=False)
    names = np.repeat(np.array(edits), per_edit)
    copies = [edit_image(_as_pil(images[int(i)]), str(e)) for i, e in zip(originals, names)]
    return copies, originals.astype(np.int64), names


# ---------------------------------------------------------------------------------------------
# The descriptor
# ---------------------------------------------------------------------------------------------
def _as_pil(item) -> Image.Image:
    image = item[0] if isinstance(item, (tuple, list)) else item
    if isinstance(image, torch.Tensor):  # [3, H, W] float in [0, 1] or uint8
        array = image.detach().cpu()
        array = (array.float().clamp(0, 1) * 255).round() if array.is_floating_point() else array.float()
        image = Image.fromarray(array.permute(1, 2, 0).numpy().astype(np.uint8))
    return image


def thumbnail(image) -> np.ndarray:
    """One image (PIL, or a [3, H, W] tensor) -> its grey thumbnail [32, 32] uint8 (squashed, antialiased)."""
    image = _as_pil(image).convert("RGB").convert("L")
    return np.asarray(image.resize((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.BILINEAR, reducing_gap=None))


def thumbnails(data, progress: bool = True) -> np.ndarray:
    """Grey thumbnails [N, 32, 32] uint8 of a --data spec, a Dataset (items: image or (image, ...)) or a list."""
    if isinstance(data, str):
        from dinolite.data import build_dataset

        data = build_dataset(data)
    n = len(data)
    out = np.empty((n, THUMBNAIL_SIZE, THUMBNAIL_SIZE), dtype=np.uint8)
    for i in tqdm(range(n), desc="copy descriptors", unit="img", disable=not progress):
        out[i] = thumbnail(data[i])
    return out


def describe(thumbs: np.ndarray, mirror: bool = False, crop: int = 0) -> np.ndarray:
    """Descriptors [N, 64] float32 of thumbnails [N, 32, 32]: unit rows, or zero rows for flat images.

    mirror: describe the mirror images; crop: describe the thumbnails with `crop` pixels cut off
    each side and resized back (a zoom), as a crop of the image would look.
    """
    x = torch.from_numpy(np.ascontiguousarray(thumbs)).float()[:, None] / 255  # [N, 1, 32, 32]
    if mirror:
        x = x.flip(-1)
    if crop:
        x = F.interpolate(x[..., crop:-crop, crop:-crop], size=x.shape[-2:], mode="bilinear", antialias=True,
                          align_corners=False)
    v = F.adaptive_avg_pool2d(x, GRID).flatten(1)
    v = v - v.mean(1, keepdim=True)
    norm = v.norm(dim=1, keepdim=True)
    v = torch.where(norm > 1e-3, v / norm.clamp_min(1e-3), torch.zeros_like(v))  # flat image: no direction
    return v.numpy().astype(np.float32)


def describe_views(thumbs: np.ndarray) -> list[np.ndarray]:
    """The views searched for copies: [the image, its mirror], each unzoomed and zoomed by ZOOM_CROPS.

    views[0] (the image itself) is what is indexed; every view is a query. 8 arrays [N, 64].
    """
    return [describe(thumbs, mirror, crop) for mirror in (False, True) for crop in (0, *ZOOM_CROPS)]


# ---------------------------------------------------------------------------------------------
# Search
# ---------------------------------------------------------------------------------------------
def _check_threshold(threshold: float) -> None:
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"the copy threshold is a cosine similarity and must be in [-1, 1], got {threshold}")


def _search(views_query, database: np.ndarray, k: int, index: str = "auto"):
    """For every row of each query view its k most similar database rows: (sims [Q, V*k], ids [Q, V*k])."""
    searcher = curation.build_index(np.ascontiguousarray(database, dtype=np.float32), index)
    k = min(k, len(database))
    sims, ids = [], []
    for view in views_query:
        s, i = searcher.search(np.ascontiguousarray(view, dtype=np.float32), k)
        sims.append(s)
        ids.append(i)
    sims, ids = np.concatenate(sims, axis=1), np.concatenate(ids, axis=1)
    sims[ids < 0] = -np.inf
    return sims, ids


def find_copies(views, threshold: float = DEFAULT_THRESHOLD, k: int = 64, index: str = "auto"):
    """Copy detection over views (describe_views, or [embeddings] for a single view): link every image
    to its k nearest neighbours (in views[0]) of each of its views with similarity >= threshold; keep
    one image (the lowest index) of each connected component.

    Returns (kept [M] sorted indices, groups: components of two or more images, each a sorted
    index array whose first entry is the one kept), as curation.find_duplicates.
    """
    _check_threshold(threshold)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n = len(views[0])
    sims, ids = _search(views, views[0], k + 1, index)  # +1: each image finds itself first
    rows = np.repeat(np.arange(n), ids.shape[1])
    cols, sims = ids.ravel(), sims.ravel()
    edge = (sims >= threshold) & (cols >= 0) & (cols != rows)
    return curation.connected_groups(n, rows[edge], cols[edge])


def best_matches(query_views, reference_views):
    """For every query image, its most similar reference image over all views in both directions
    (a query may be a crop of a reference or the other way round).

    Returns (similarity [Q], reference index [Q]).
    """
    sims, ids = _search(query_views, reference_views[0], 1)  # query views -> references
    best = sims.argmax(1)
    sim, ref = sims[np.arange(len(sims)), best], ids[np.arange(len(ids)), best]
    back_sims, back_ids = _search(reference_views, query_views[0], 8)  # reference views -> queries
    refs = np.repeat(np.arange(len(reference_views[0])), back_ids.shape[1])
    _keep_best(sim, ref, back_ids.ravel(), back_sims.ravel(), refs)
    return sim.astype(np.float32), ref.astype(np.int64)


def _keep_best(best, best_other, index, sims, other) -> None:
    """In place: best[index[e]] = max(best[index[e]], sims[e]) with best_other following the maximum."""
    valid = index >= 0
    index, sims, other = index[valid], sims[valid], other[valid]
    order = np.lexsort((sims, index))  # by index, then similarity ascending: the last of each index is its best
    index, sims, other = index[order], sims[order], other[order]
    last = np.r_[index[1:] != index[:-1], True]
    index, sims, other = index[last], sims[last], other[last]
    better = sims > best[index]
    best[index[better]], best_other[index[better]] = sims[better], other[better]


def find_copies_of(query_views, reference_views, threshold: float = DEFAULT_THRESHOLD):
    """Query images that are copies of a reference set (decontamination: references = an evaluation set).

    Returns (indices [M] of the query images, matched reference index [M], similarity [M]).
    """
    _check_threshold(threshold)
    sim, ref = best_matches(query_views, reference_views)
    hit = np.flatnonzero(sim >= threshold)
    return hit.astype(np.int64), ref[hit], sim[hit]


# ---------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------
def pair_similarity(views_a, views_b) -> np.ndarray:
    """[N] similarity of image i of a to image i of b: the maximum over all views in both directions."""
    best = np.full(len(views_a[0]), -np.inf, dtype=np.float32)
    for view in views_a:
        best = np.maximum(best, np.einsum("nd,nd->n", view, views_b[0]))
    for view in views_b:
        best = np.maximum(best, np.einsum("nd,nd->n", view, views_a[0]))
    return best


def nearest_other(views, sample, k: int = 8) -> np.ndarray:
    """[S] similarity of each image of `sample` (indices) to its most similar *other* image, over all views."""
    sample = np.asarray(sample, dtype=np.int64)
    sims, ids = _search([v[sample] for v in views], views[0], k + 1)  # the sample's views -> every image
    sims[ids == sample[:, None]] = -np.inf
    best = sims.max(1)
    back_sims, back_ids = _search(views, views[0][sample], 2)  # every image's views -> the sample
    rows = np.repeat(np.arange(len(views[0])), back_ids.shape[1])
    back_ids, back_sims = back_ids.ravel(), back_sims.ravel()
    other = (back_ids >= 0) & (sample[np.maximum(back_ids, 0)] != rows)
    _keep_best(best, np.zeros(len(best), dtype=np.int64), back_ids[other], back_sims[other], rows[other])
    return best


def choose_threshold(copy_similarity, distinct_similarity, copy_quantile: float = 0.01,
                     distinct_quantile: float = 0.995) -> dict:
    """The threshold between planted copies and distinct images.

    copy_similarity [C]: each planted copy to its original; distinct_similarity [S]: each sampled
    image to its most similar other image. low = the copy_quantile of the copies, high = the
    distinct_quantile of the distinct images (a few real copies in the pool do not move it).
    threshold = (low + high) / 2 when low > high (they separate); otherwise high: precision first,
    and `separated` is False. Also returns the share of copies found and of distinct images
    linked at the threshold.
    """
    copies = np.asarray(copy_similarity, dtype=np.float64)
    distinct = np.asarray(distinct_similarity, dtype=np.float64)
    if copies.size == 0 or distinct.size == 0:
        raise ValueError("calibration needs at least one planted copy and one distinct image")
    low, high = float(np.quantile(copies, copy_quantile)), float(np.quantile(distinct, distinct_quantile))
    threshold = (low + high) / 2 if low > high else high
    return {"threshold": threshold, "copies_low": low, "distinct_high": high, "separated": low > high,
            "copies_found": float((copies >= threshold).mean()), "distinct_linked": float((distinct >= threshold).mean())}


def calibrate(images, views, views_of, per_edit: int = 100, sample_size: int = 1000, seed: int = 0) -> dict:
    """`--dedup-threshold auto`: plant copies of the pool's own images and pick the threshold.

    images: the pool (indexable: PIL images or (image, ...) items); views: its views (describe_views
    of its thumbnails, or [embeddings]); views_of: list of PIL images -> their views, the same way.
    Plants per_edit copies for each of EDITS (fewer on a small pool: at most half the pool in all),
    and compares their similarity to their originals with the most similar other image of
    sample_size random pool images. Returns choose_threshold's dict plus "planted" and "sampled".
    """
    n = len(images)
    per_edit = max(1, min(per_edit, n // (2 * len(EDITS))))
    if n < 2 * len(EDITS):
        raise ValueError(f"the pool has {n} images; calibration needs at least {2 * len(EDITS)} "
                         "(pass a number to --dedup-threshold instead)")
    copies, source, _ = plant_copies(images, per_edit, seed=seed)
    copy_views = views_of(copies)
    copy_similarity = pair_similarity(copy_views, [v[source] for v in views])
    sample = np.sort(np.random.default_rng(seed + 1).choice(n, min(n, sample_size), replace=False))
    result = choose_threshold(copy_similarity, nearest_other(views, sample))
    return {**result, "planted": len(copies), "sampled": len(sample)}


def score_by_edit(groups, source, edit) -> dict:
    """Copy detection scored against planted copies, by edit.

    groups: the duplicate groups (index arrays, kept first); source [N]: the original each image
    was made from (itself for originals); edit [N]: "original" or the edit's name.
    Returns {"all": {removed, precision, recall} (curation.duplicate_precision_recall),
    edit: {copies, recall, precision}}: an edit's recall is the share of its copies in one group
    with their original; its precision, over the groups holding one of its copies, the share of
    removed images that have an image of the same source in their group.
    """
    source, edit = np.asarray(source), np.asarray(edit)
    n = len(source)
    group_of = np.full(n, -1)
    removed = np.zeros(n, dtype=bool)
    for g, members in enumerate(groups):
        group_of[members] = g
        removed[members[1:]] = True
    precision, recall = curation.duplicate_precision_recall(np.flatnonzero(~removed), source)
    original_of = {int(s): i for i, (s, e) in enumerate(zip(source, edit)) if e == "original"}
    scores = {"all": {"removed": int(removed.sum()), "precision": precision, "recall": recall}}
    for name in [e for e in dict.fromkeys(edit.tolist()) if e != "original"]:
        copies = np.flatnonzero(edit == name)
        originals = np.array([original_of[int(source[c])] for c in copies])
        found = (group_of[copies] >= 0) & (group_of[copies] == group_of[originals])
        touched = [groups[g] for g in np.unique(group_of[copies][group_of[copies] >= 0])]
        removals = [(m, g) for g in touched for m in g[1:]]
        correct = sum(int((source[g] == source[m]).sum() > 1) for m, g in removals)
        scores[name] = {"copies": len(copies), "recall": float(found.mean()),
                        "precision": correct / len(removals) if removals else 1.0}
    return scores


# ---------------------------------------------------------------------------------------------
# A contact sheet: people check copy detection by looking
# ---------------------------------------------------------------------------------------------
def contact_sheet(load_image, groups, path, largest: int = 8, random_groups: int = 8, per_row: int = 10,
                  cell: int = 64, seed: int = 0) -> list[int]:
    """Write a PNG with one row per duplicate group: the `largest` largest groups, then
    `random_groups` others drawn at random. Each row shows up to per_row images, the kept one
    first with a green frame, removed ones with a red frame, and the group's size on the left.

    load_image: index -> PIL image. Returns the positions in `groups` of the rows shown.
    """
    from PIL import ImageDraw

    order = sorted(range(len(groups)), key=lambda g: (-len(groups[g]), g))
    shown = order[:largest]
    rest = order[largest:]
    if rest and random_groups > 0:
        rng = np.random.default_rng(seed)
        shown += sorted(int(g) for g in rng.choice(rest, min(random_groups, len(rest)), replace=False))
    label_width, pad = 56, 4
    rows, columns = max(1, len(shown)), max([2] + [min(per_row, len(groups[g])) for g in shown])
    sheet = Image.new("RGB", (label_width + columns * (cell + pad), rows * (cell + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    if not shown:
        draw.text((pad, pad), "no duplicate groups", fill="black")
    for row, g in enumerate(shown):
        y = pad + row * (cell + pad)
        kind = "largest" if row < largest else "random"
        draw.text((pad, y + cell // 2 - 12), f"{len(groups[g])} imgs\n{kind}", fill="black")
        for col, index in enumerate(groups[g][:per_row]):
            x = label_width + col * (cell + pad)
            image = _as_pil(load_image(int(index))).convert("RGB").resize((cell - 4, cell - 4), Image.NEAREST)
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=(0, 160, 0) if col == 0 else (200, 0, 0))
            sheet.paste(image, (x + 2, y + 2))
    tmp = f"{path}.partial.png"
    sheet.save(tmp)
    os.replace(tmp, path)
    return shown
