"""Training batches as a pure function of (seed, step, rank).

`StepBatches[step]` is the whole collated multi-crop batch of one optimiser step on one rank.
Its image indices and every random number of its augmentations and masks are derived from
(seed, step, rank) alone, so a run resumed at step s reads exactly the batches an uninterrupted
run reads from step s on, whatever the number of DataLoader workers. No sampler or RNG state
needs to be saved.

Data order: the global stream of images is epoch after epoch of a permutation of the dataset,
permutation e drawn from (seed, e); step s on rank r takes stream positions
[s * world * B + r * B, s * world * B + (r + 1) * B).
"""
import math

import numpy as np
import torch

from dinolite.data import DataError, MultiCropAugmentation
from dinolite.masking import MaskingGenerator, collate_multicrop
from dinolite.train.config import Config, parse_size_pairs

# Stream tags keep the random streams of one step independent of each other.
_ORDER, _AUGMENT, _MASKS, _MODEL, _SIZES = 0, 1, 2, 3, 4


def derive_seed(*numbers: int) -> int:
    """A 63-bit seed mixing any number of non-negative integers (numpy SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(n) for n in numbers]).generate_state(2, np.uint64)[0] >> 1)


def seed_step(seed: int, step: int, rank: int = 0) -> None:
    """Seed torch's global RNG for the model's random numbers of one step on one rank (drop path, RoPE jitter)."""
    torch.manual_seed(derive_seed(seed, step, rank, _MODEL))


def step_generator(seed: int, step: int, rank: int, tag: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, step, rank, tag))


def build_augmentation(cfg: Config, sizes: tuple[int, int] | None = None) -> MultiCropAugmentation:
    """The multi-crop augmentation of cfg.crops, at sizes = (global, local) when given."""
    c = cfg.crops
    global_size, local_size = sizes or (c.global_size, c.local_size)
    return MultiCropAugmentation(
        global_size=global_size, local_size=local_size, n_local=c.n_local,
        global_scale=(c.global_scale_min, 1.0), local_scale=(c.local_scale_min, c.local_scale_max),
        blur_sigma=(c.blur_sigma_min, c.blur_sigma_max), flip_p=c.flip_probability,
        gram_size=gram_crop_size(cfg, global_size),
    )


def decode_side(cfg: Config) -> int:
    """The shorter image side that JPEGs may be decoded down to with no crop of the run losing resolution.

    A random resized crop covers a fraction s >= scale_min of the image's area with an aspect ratio in [3/4, 4/3],
    so its shorter side is at least sqrt(0.75 s W H) >= sqrt(0.75 scale_min) * min(W, H). It is resized to `size`
    pixels, so min(W, H) >= size / sqrt(0.75 scale_min) keeps every crop at or above its output resolution.
    DINOv2's 98 px locals from 5 % of the image: 507 px; tiny-cpu's 16 px locals from 10 %: 59 px.
    """
    c = cfg.crops
    pairs = parse_size_pairs(c.size_pairs) or [(c.global_size, c.local_size, 1.0)]
    sides = []
    for global_size, local_size, _ in pairs:
        sides.append(max(global_size, gram_crop_size(cfg, global_size) or 0) / math.sqrt(0.75 * c.global_scale_min))
        if c.n_local:
            sides.append(local_size / math.sqrt(0.75 * c.local_scale_min))
    return math.ceil(max(sides))


def gram_crop_size(cfg: Config, global_size: int | None = None) -> int | None:
    """Size of the Gram teacher's crops (the global crops' boxes at gram.teacher_scale x the global size,
    without photometric distortion), or None when the teacher sees the student's global crops."""
    if cfg.gram.weight == 0.0 or cfg.gram.teacher_scale == 1.0:
        return None
    return int(cfg.gram.teacher_scale * (global_size or cfg.crops.global_size))


def crop_sizes_at(cfg: Config, step: int) -> tuple[int, int]:
    """(global, local) crop size of `step`: one draw from crops.size_pairs seeded by (seed, step) alone, so
    every rank trains at the same resolution (DINOv3 high-resolution adaptation)."""
    pairs = parse_size_pairs(cfg.crops.size_pairs)
    if not pairs:
        return cfg.crops.global_size, cfg.crops.local_size
    gen = torch.Generator().manual_seed(derive_seed(cfg.train.seed, step, _SIZES))
    choice = int(torch.multinomial(torch.tensor([p for _, _, p in pairs], dtype=torch.float64), 1, generator=gen))
    return pairs[choice][:2]


class StepBatches(torch.utils.data.Dataset):
    """Item `step` -> collated batch dict (collate_multicrop) for steps [start_step, total_steps).

    Args:
        dataset: indexable, item i -> image or (image, label, ...).
        cfg: the Config (crops, masking, batch size, seed).
        total_steps: number of optimiser steps in the run.
        start_step: first step served (resuming).
        rank, world_size: this process and the number of processes.
    """

    def __init__(self, dataset, cfg: Config, total_steps: int, start_step: int = 0, rank: int = 0,
                 world_size: int = 1):
        if len(dataset) < cfg.train.batch_size * world_size:
            most = len(dataset) // world_size
            fix = f"set train.batch_size={most} (or less) or use more images" if most >= 2 else "use more images"
            raise DataError(f"the dataset has {len(dataset)} images, fewer than one global batch "
                            f"(train.batch_size={cfg.train.batch_size} x {world_size} processes); {fix}")
        self.dataset, self.cfg = dataset, cfg
        self.total_steps, self.start_step = total_steps, start_step
        self.rank, self.world_size = rank, world_size
        self.augmentation = build_augmentation(cfg)
        self._augmentations = {}  # (global, local) -> augmentation, for crops.size_pairs
        grid = cfg.crops.global_size // cfg.model.patch_size
        self.grid = grid
        self._perm_epoch, self._perm = None, None

    def __len__(self) -> int:
        return self.total_steps - self.start_step

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm_epoch != epoch:  # cached: consecutive steps share an epoch
            gen = torch.Generator().manual_seed(derive_seed(self.cfg.train.seed, epoch, _ORDER))
            self._perm, self._perm_epoch = torch.randperm(len(self.dataset), generator=gen), epoch
        return self._perm

    def indices(self, step: int) -> list[int]:
        """Dataset indices of the images of `step` on this rank."""
        B, n = self.cfg.train.batch_size, len(self.dataset)
        first = step * self.world_size * B + self.rank * B
        out = []
        for position in range(first, first + B):
            epoch, i = divmod(position, n)
            out.append(int(self._permutation(epoch)[i]))
        return out

    def __getitem__(self, item: int) -> dict:
        step = self.start_step + item
        seed, c = self.cfg.train.seed, self.cfg.crops
        augmentation, grid = self.augmentation, self.grid
        if c.size_pairs:
            sizes = crop_sizes_at(self.cfg, step)
            if sizes not in self._augmentations:
                self._augmentations[sizes] = build_augmentation(self.cfg, sizes)
            augmentation, grid = self._augmentations[sizes], sizes[0] // self.cfg.model.patch_size
        samples = []
        for j, index in enumerate(self.indices(step)):
            entry = self.dataset[index]
            image, label = (entry[0], entry[1]) if isinstance(entry, (tuple, list)) else (entry, None)
            gen = torch.Generator().manual_seed(derive_seed(seed, step, self.rank, _AUGMENT, j))
            crops = augmentation(image, generator=gen)
            samples.append(crops if label is None else (crops, label))
        mask_generator = MaskingGenerator(grid, generator=step_generator(seed, step, self.rank, _MASKS))
        batch = collate_multicrop(
            samples, mask_generator, mask_probability=c.mask_probability,
            mask_ratio_range=(c.mask_ratio_min, c.mask_ratio_max), patch_size=self.cfg.model.patch_size,
            ratio_mode=c.mask_ratio_mode, complete_masks=c.complete_masks,
            generator=step_generator(seed, step, self.rank, _MASKS + 100),
        )
        batch["step"] = step
        return batch


def move_batch(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
