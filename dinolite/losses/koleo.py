"""KoLeo: the Kozachenko-Leonenko entropy estimator used as a regulariser (Sablayrolles et al.).

On L2-normalised features f_i, loss = -(1/B) sum_i log(min_{j != i} ||f_i - f_j||): it is large
when some feature has a very close neighbour, so minimising it spreads the batch over the
sphere. Numerics follow the official code step by step (normalise with eps 1e-8; neighbour =
largest dot product with the diagonal excluded; distance ||f_i - f_j + eps||, eps 1e-8, as
torch.nn.PairwiseDistance computes it; -mean(log(d + 1e-8))) except that we always compute in
float32: the official code only disables autocast, so fp16 inputs underflow eps and a
duplicated sample gives log(0) = -inf.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from dinolite import distributed


def _koleo_against(queries, candidates, query_offset, eps):
    """KoLeo of `queries` [b, D] with neighbours searched in `candidates` [n, D] (both normalised).

    Row i of queries is row query_offset + i of candidates and may not be its own neighbour.
    """
    b = queries.shape[0]
    with torch.no_grad():
        dots = queries @ candidates.T  # [b, n]; on the sphere, largest dot = smallest distance
        rows = torch.arange(b, device=queries.device)
        dots[rows, rows + query_offset] = -1.0
        neighbour = dots.argmax(dim=1)
    distances = F.pairwise_distance(queries, candidates[neighbour], p=2, eps=eps)
    return -torch.log(distances + eps).mean()


def koleo_loss(features, eps=1e-8):
    """KoLeo loss of one batch: features [B, D] (any float dtype) -> float32 scalar.

    Always float32, autocast disabled. B = 1 has no neighbour, so the estimator is undefined: we
    return 0 (still attached to the graph, with zero gradient) rather than raise, since a
    last batch of one can happen in practice. Duplicate rows give a large but finite loss.
    """
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"koleo_loss expects features [B, D] with B >= 1, got {tuple(features.shape)}")
    with torch.autocast(device_type=features.device.type, enabled=False):
        x = features.float()
        if x.shape[0] == 1:
            return x.sum() * 0.0
        x = F.normalize(x, p=2, dim=-1, eps=eps)
        return _koleo_against(x, x, 0, eps)


class KoLeoLoss(nn.Module):
    """KoLeo with neighbours searched across processes (DINOv3's distributed variant).

    Every rank gathers the normalised features of all ranks (differentiably), keeps those of its
    group of `group_size` consecutive ranks, and computes the loss of its own rows with
    neighbours searched in the whole group. group_size=None: one group of all ranks;
    group_size=1: each rank alone (DINOv2). Single process: identical to koleo_loss.

    All ranks must pass the same local batch size. The mean over ranks of the per-rank losses
    equals koleo_loss on the group's concatenated batch; with DDP's gradient averaging, the
    parameter gradients are exactly those of that global mean (the gather's backward sends each
    rank the gradients every rank computed for its rows). DINOv3 counts its group size in
    samples (loss_group_size); ours counts ranks: samples = group_size * local batch.
    """

    def __init__(self, group_size=None, eps=1e-8):
        super().__init__()
        if group_size is not None and group_size < 1:
            raise ValueError(f"group_size must be None or >= 1, got {group_size}")
        self.group_size = group_size
        self.eps = eps

    def forward(self, features):
        """features [B_local, D] -> float32 scalar, the loss of this rank's rows."""
        world_size = distributed.get_world_size()
        group_size = world_size if self.group_size is None else self.group_size
        if world_size == 1 or group_size == 1:
            return koleo_loss(features, self.eps)
        if world_size % group_size:
            raise ValueError(f"world size {world_size} is not divisible by KoLeo group_size {group_size}")
        if features.ndim != 2 or features.shape[0] == 0:
            raise ValueError(f"KoLeoLoss expects features [B, D] with B >= 1, got {tuple(features.shape)}")
        with torch.autocast(device_type=features.device.type, enabled=False):
            x = F.normalize(features.float(), p=2, dim=-1, eps=self.eps)
            everyone = distributed.all_gather_cat(x)  # [world * B, D]
            b, rank = x.shape[0], distributed.get_rank()
            first = (rank // group_size) * group_size
            group = everyone[first * b:(first + group_size) * b]
            return _koleo_against(x, group, (rank - first) * b, self.eps)
