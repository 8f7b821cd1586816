"""Block-wise masks for iBOT and the multi-crop collate function that draws them.

The student sees its global crops with some patches replaced by a learned mask token; the
iBOT loss asks it to predict, at those positions, what the teacher (who saw the pixels) says.
DINOv2 masks *blocks* of neighbouring patches rather than isolated ones: an isolated masked
patch can be guessed by interpolating its neighbours, a block cannot.

Randomness comes from torch's random number generator: the global one by default (which
`torch.manual_seed` makes reproducible and DataLoader workers seed differently), or an
explicit `torch.Generator` for fully deterministic draws.
"""
import math

import numpy as np
import torch

MAX_ATTEMPTS_PER_BLOCK = 10


def _as_generator(generator_or_seed):
    """None -> None (global RNG); int -> a seeded torch.Generator; a torch.Generator -> itself."""
    if generator_or_seed is None or isinstance(generator_or_seed, torch.Generator):
        return generator_or_seed
    if isinstance(generator_or_seed, (int, np.integer)):
        return torch.Generator().manual_seed(int(generator_or_seed))
    raise TypeError(f"expected None, an int seed or a torch.Generator, got {type(generator_or_seed).__name__}")


class MaskingGenerator:
    """Draws block-wise boolean masks on an H x W patch grid (the DINOv2/BEiT algorithm).

    Blocks are added one at a time until the requested number of patches is masked or no block
    can be added. Each block gets up to 10 attempts: area ~ U(min_num_patches, max_block),
    aspect ratio log-uniform in [min_aspect, max_aspect], h = round(sqrt(area * aspect)),
    w = round(sqrt(area / aspect)), a uniformly random position; an attempt is accepted if it
    masks between 1 and `max_block` new patches, where max_block = min(patches still to mask,
    max_num_patches). The result therefore never exceeds the target but may fall short of it;
    `complete=True` (DINOv3) then masks random extra patches to reach the target exactly.

    Args:
        input_size: patch grid size, int (square) or (H, W).
        max_num_patches: largest number of new patches one block may add (default 0.5 * H * W).
        min_num_patches: smallest block area drawn (default 4).
        min_aspect, max_aspect: aspect-ratio range of the blocks (max_aspect defaults to 1/min_aspect).
        generator: None (torch's global RNG), an int seed, or a torch.Generator. Note: a seeded
            generator is copied into every DataLoader worker, which then all draw the same masks;
            leave it None there.
    """

    def __init__(self, input_size, max_num_patches=None, min_num_patches=4, min_aspect=0.3,
                 max_aspect=None, generator=None):
        if isinstance(input_size, int):
            input_size = (input_size, input_size)
        self.height, self.width = (int(s) for s in input_size)
        if self.height < 1 or self.width < 1:
            raise ValueError(f"input_size must be positive, got {input_size}")
        self.num_patches = self.height * self.width
        self.max_num_patches = 0.5 * self.num_patches if max_num_patches is None else max_num_patches
        self.min_num_patches = min_num_patches
        max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
        if not 0 < min_aspect <= max_aspect:
            raise ValueError(f"need 0 < min_aspect <= max_aspect, got {min_aspect}, {max_aspect}")
        self.log_aspect_range = (math.log(min_aspect), math.log(max_aspect))
        self.generator = _as_generator(generator)

    @property
    def input_size(self):
        return (self.height, self.width)

    def __repr__(self):
        return (f"MaskingGenerator(input_size={self.input_size}, max_num_patches={self.max_num_patches}, "
                f"min_num_patches={self.min_num_patches}, aspect=({math.exp(self.log_aspect_range[0]):.3g}, "
                f"{math.exp(self.log_aspect_range[1]):.3g}))")

    def draw_block(self, max_block):
        """Propose one block: returns (top, left, h, w), or None if it does not fit the grid."""
        area, log_aspect, u_top, u_left = torch.rand(4, generator=self.generator, dtype=torch.float64).tolist()
        area = self.min_num_patches + (max_block - self.min_num_patches) * area
        lo, hi = self.log_aspect_range
        aspect = math.exp(lo + (hi - lo) * log_aspect)
        h = int(round(math.sqrt(area * aspect)))
        w = int(round(math.sqrt(area / aspect)))
        if not (0 < h < self.height and 0 < w < self.width):
            return None
        top = int(u_top * (self.height - h + 1))
        left = int(u_left * (self.width - w + 1))
        return top, left, h, w

    def _add_block(self, mask, max_block):
        """Try up to 10 blocks; paint the first that adds 1..max_block new patches. Returns patches added."""
        for _ in range(MAX_ATTEMPTS_PER_BLOCK):
            block = self.draw_block(max_block)
            if block is None:
                continue
            top, left, h, w = block
            window = mask[top:top + h, left:left + w]
            new = h * w - int(window.sum())
            if 0 < new <= max_block:
                window[...] = True
                return new
        return 0

    def __call__(self, num_masking_patches=0, complete=False):
        """Return a bool tensor [H, W] with at most (exactly, if complete) num_masking_patches True."""
        num_masking_patches = int(num_masking_patches)
        if not 0 <= num_masking_patches <= self.num_patches:
            raise ValueError(f"num_masking_patches={num_masking_patches} is outside [0, {self.num_patches}] "
                             f"for a {self.height}x{self.width} grid")
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < num_masking_patches:
            max_block = min(num_masking_patches - count, self.max_num_patches)
            added = self._add_block(mask, max_block)
            if added == 0:
                break
            count += added
        mask = torch.from_numpy(mask)
        if complete and count < num_masking_patches:
            free = (~mask).flatten().nonzero().flatten()
            order = torch.randperm(len(free), generator=self.generator)
            mask.view(-1)[free[order[:num_masking_patches - count]]] = True
        return mask


def _split_sample(sample):
    if isinstance(sample, dict):
        return sample, None
    if isinstance(sample, (tuple, list)) and len(sample) >= 2 and isinstance(sample[0], dict):
        return sample[0], sample[1]
    raise TypeError("each sample must be a MultiCropAugmentation dict or a (dict, label) tuple, "
                    f"got {type(sample).__name__}")


def _stack_crop_major(crop_lists, name):
    """crop_lists[b][c] = crop c of image b -> tensor [n_crops * B, ...] ordered crop c, then image b."""
    n_crops = {len(crops) for crops in crop_lists}
    if len(n_crops) != 1:
        raise ValueError(f"samples disagree on the number of {name}: {sorted(n_crops)}")
    n_crops = n_crops.pop()
    if n_crops == 0:
        return None
    shapes = {tuple(crop.shape) for crops in crop_lists for crop in crops}
    if len(shapes) != 1:
        raise ValueError(f"all {name} must have the same shape to be stacked, got {sorted(shapes)}; "
                         "use one MultiCropAugmentation (fixed crop sizes) for the whole batch")
    return torch.stack([crops[c] for c in range(n_crops) for crops in crop_lists])


def collate_multicrop(samples, mask_generator, mask_probability=0.5, mask_ratio_range=(0.1, 0.5),
                      dtype=torch.float32, patch_size=None, ratio_mode="uniform", complete_masks=False,
                      generator=None):
    """Stack a list of multi-crop samples into a batch and draw the iBOT masks.

    Of the 2B global crops, n = int(2B * mask_probability) are masked. Their mask ratios come
    from the bins of linspace(lo, hi, n + 1): crop i uses a ratio drawn uniformly in bin i
    (ratio_mode="uniform", DINOv2) or the bin's upper edge (ratio_mode="upper", DINOv3), and
    asks the generator for int(N * ratio) patches. The other crops get empty masks, and the
    masks are shuffled over the 2B crops.

    Args:
        samples: list of B dicts from MultiCropAugmentation (global_crops: 2 x [3,G,G],
            local_crops: n_l x [3,L,L]) or of (dict, label) tuples.
        mask_generator: a MaskingGenerator on the global crops' patch grid.
        patch_size: if given, checked against G and the generator's grid (recommended).
        complete_masks: fill masks up to the exact target (DINOv3).
        generator: None, an int seed or a torch.Generator for the ratios and the shuffle.

    Returns a dict:
        global_crops [2B,3,G,G] crop-major (all first crops, then all second crops), in `dtype`;
        local_crops [n_l*B,3,L,L] crop-major, or None when there are no local crops;
        masks bool [2B,N]; mask_indices [M] long, flat indices into the 2B*N patch tokens;
        masks_weight [M] float32, 1 / (number of masked patches of the patch's image);
        n_masked_patches 0-dim long tensor (= M); upperbound int, sum over masked crops of
        int(N * bin upper edge), an upper bound on M (for static shapes);
        gram_crops [2B,3,S,S] crop-major when the samples carry them (the Gram teacher's crops);
        labels [B] when the samples carry labels.
    """
    if not samples:
        raise ValueError("collate_multicrop got an empty list of samples")
    if not 0.0 <= mask_probability <= 1.0:
        raise ValueError(f"mask_probability must be in [0, 1], got {mask_probability}")
    lo, hi = mask_ratio_range
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"mask_ratio_range must satisfy 0 <= lo <= hi <= 1, got {mask_ratio_range}")
    if ratio_mode not in ("uniform", "upper"):
        raise ValueError(f"ratio_mode must be 'uniform' (DINOv2) or 'upper' (DINOv3), got {ratio_mode!r}")
    generator = _as_generator(generator)

    dicts, labels = zip(*(_split_sample(s) for s in samples))
    global_crops = _stack_crop_major([d["global_crops"] for d in dicts], "global crops")
    local_crops = _stack_crop_major([d.get("local_crops", []) for d in dicts], "local crops")
    if global_crops is None:
        raise ValueError("samples have no global crops")

    grid_h, grid_w = mask_generator.input_size
    crop_h, crop_w = global_crops.shape[-2:]
    if patch_size is not None:
        if crop_h % patch_size or crop_w % patch_size:
            raise ValueError(f"global crop size {crop_h}x{crop_w} is not a multiple of patch_size {patch_size}")
        if (crop_h // patch_size, crop_w // patch_size) != (grid_h, grid_w):
            raise ValueError(f"global crops {crop_h}x{crop_w} with patch {patch_size} give a "
                             f"{crop_h // patch_size}x{crop_w // patch_size} grid but the mask generator is "
                             f"{grid_h}x{grid_w}; build MaskingGenerator(({crop_h // patch_size}, "
                             f"{crop_w // patch_size}))")

    n_images = global_crops.shape[0]  # 2B
    n_tokens = grid_h * grid_w
    n_masked_crops = int(n_images * mask_probability)
    edges = torch.linspace(lo, hi, n_masked_crops + 1, dtype=torch.float64).tolist()
    masks, upperbound = [], 0
    for i in range(n_masked_crops):
        if ratio_mode == "uniform":
            u = torch.rand((), generator=generator, dtype=torch.float64).item()
            ratio = edges[i] + (edges[i + 1] - edges[i]) * u
        else:
            ratio = edges[i + 1]
        masks.append(mask_generator(int(n_tokens * ratio), complete=complete_masks))
        upperbound += int(n_tokens * edges[i + 1])
    masks += [torch.zeros(grid_h, grid_w, dtype=torch.bool)] * (n_images - n_masked_crops)
    order = torch.randperm(n_images, generator=generator).tolist()
    masks = torch.stack([masks[j] for j in order]).flatten(1)  # [2B, N]

    mask_indices = masks.flatten().nonzero().flatten()
    per_image_weight = 1.0 / masks.sum(-1).clamp(min=1).float()  # [2B]
    masks_weight = per_image_weight[mask_indices // n_tokens]

    batch = dict(
        global_crops=global_crops.to(dtype),
        local_crops=None if local_crops is None else local_crops.to(dtype),
        masks=masks,
        mask_indices=mask_indices,
        masks_weight=masks_weight,
        n_masked_patches=torch.tensor(len(mask_indices), dtype=torch.long),
        upperbound=upperbound,
    )
    gram_crops = _stack_crop_major([d.get("gram_crops", []) for d in dicts], "Gram teacher crops")
    if gram_crops is not None:
        batch["gram_crops"] = gram_crops.to(dtype)
    if all(label is not None for label in labels):
        batch["labels"] = torch.as_tensor(labels)
    return batch
