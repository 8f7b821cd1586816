"""The Gram teacher (DINOv3): a frozen, headless backbone whose patch-similarity matrices anchor the student's.

DINOv3 takes it from an EARLY checkpoint of the same run (dense features peak early, then degrade), and
may refresh it a few times by copying the EMA teacher's backbone (7B: every 10k iterations from 1.01M,
at most 3 times, then frozen). It sees the student's global crops, optionally at a higher resolution
(the same crop geometry at 2x the size, without photometric distortion); its patch grid is then
resized to the student's before the Gram matrices are compared (`dinolite.losses.gram_loss`).
"""
import copy

import torch
import torch.nn.functional as F
from torch import nn

from dinolite import hub
from dinolite.checkpoint import CheckpointError, resolve_checkpoint
from dinolite.models import VisionTransformer


def resize_patch_grid(patches: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Patch features [B, h*w, D] on an h x w grid -> [B, H*W, D] on an H x W grid.

    Bicubic, align_corners=False, no antialias (as officially), computed in fp32, returned in fp32.
    """
    batch, tokens, dim = patches.shape
    h, w = grid
    if tokens != h * w:
        raise ValueError(f"patches hold {tokens} tokens, not a {h} x {w} grid")
    if (h, w) == tuple(size):
        return patches.float()
    maps = patches.float().transpose(1, 2).reshape(batch, dim, h, w)
    maps = F.interpolate(maps, size=tuple(size), mode="bicubic", align_corners=False, antialias=False)
    return maps.flatten(2).transpose(1, 2)


class GramTeacher(nn.Module):
    """A headless backbone without gradients, in eval mode, with an optional refresh schedule.

    Args:
        backbone: the architecture (a copy is kept; its weights are replaced by `load` or `refresh_from`).
        update_every: refresh every this many steps (0: never refresh).
        first_update: no refresh before this step; refreshes happen at multiples of update_every.
        max_updates: at most this many refreshes (0: no limit).

    The number of refreshes done is a buffer (`n_updates`), so a checkpoint of this module resumes the
    schedule exactly.
    """

    def __init__(self, backbone: VisionTransformer, update_every: int = 0, first_update: int = 0,
                 max_updates: int = 0):
        super().__init__()
        if update_every < 0 or first_update < 0 or max_updates < 0:
            raise ValueError("update_every, first_update and max_updates must be >= 0, got "
                             f"{update_every}, {first_update}, {max_updates}")
        self.backbone = copy.deepcopy(backbone).requires_grad_(False).eval()
        self.update_every, self.first_update, self.max_updates = update_every, first_update, max_updates
        self.register_buffer("n_updates", torch.zeros((), dtype=torch.long))

    def train(self, mode: bool = True):
        """Always in eval mode: no drop path, no RoPE coordinate augmentation."""
        super().train(False)
        return self

    def load(self, source: str, step: int | None = None) -> "GramTeacher":
        """Load the backbone from a dinolite run directory (+ step), a dinolite checkpoint, or an
        official-layout file (strictly, via dinolite.hub.load_official). Returns self."""
        path = resolve_checkpoint(source, step)
        try:
            hub.load_official(self.backbone, torch.load(path, map_location="cpu", weights_only=False))
        except ValueError as e:
            first_problem = (str(e).splitlines()[1:] or [str(e)])[0].strip()  # line 0 is a heading
            raise CheckpointError(f"the Gram teacher {path} does not fit the model ({first_problem}, ...): anchor "
                                  "to a checkpoint of a run with the same model.* settings") from None
        return self

    def should_refresh(self, step: int) -> bool:
        """True before `step` when step >= max(first_update, 1) and step % update_every == 0, until max_updates
        refreshes: DINOv3 (dinov3/train/train.py:535-544) refreshes after iteration it when (it + 1) >=
        it_first_update and (it + 1) % update_frequency == 0, i.e. before step it + 1 (never before step 0).
        The multiples of update_every count, not first_update + k x update_every: first 15, every 10 -> 20, 30."""
        if self.update_every == 0 or step < max(self.first_update, 1) or step % self.update_every:
            return False
        return self.max_updates == 0 or int(self.n_updates) < self.max_updates

    @torch.no_grad()
    def refresh_from(self, ema_backbone: nn.Module) -> None:
        """Copy the EMA teacher's backbone weights (and buffers) into the Gram teacher."""
        self.backbone.load_state_dict(ema_backbone.state_dict(), strict=True)
        self.n_updates += 1

    def maybe_refresh(self, step: int, ema_backbone: nn.Module) -> bool:
        """Refresh if the schedule says so at `step`; returns whether it did."""
        if self.should_refresh(step):
            self.refresh_from(ema_backbone)
            return True
        return False

    @torch.no_grad()
    def patch_features(self, images: torch.Tensor, student_grid: tuple[int, int] | None = None) -> torch.Tensor:
        """images [B, 3, H, W] -> final-norm patch features [B, P, D] in fp32, resized to student_grid
        (h, w) if given and different from this teacher's grid (high-resolution teacher). Computed on the
        backbone's device (the images are moved there: CPU images into a GPU teacher work) and returned there."""
        device = next(self.backbone.parameters()).device
        patches = self.backbone.forward_features(images.to(device))["x_norm_patchtokens"]
        grid = (images.shape[-2] // self.backbone.patch_size, images.shape[-1] // self.backbone.patch_size)
        return resize_patch_grid(patches, grid, student_grid or grid)
