"""Turning teacher logits into targets that cannot collapse: EMA centering and Sinkhorn-Knopp.

Both take teacher logits [B, K] and a teacher temperature and return probabilities [B, K].

* `SoftmaxCenter` (DINO, DINOv2 small models): softmax((t - c) / T) with c an exponential moving
  average of the batch mean of the logits.
* `sinkhorn_knopp` (DINOv2 ViT-L/g, all of DINOv3): a few Sinkhorn-Knopp iterations that give every
  prototype the same share of the batch, computed in the log domain so that it stays finite where
  the official (plain exp) version overflows.

Both are distributed-aware: with an initialised process group every batch statistic is taken over
the global batch, so N ranks holding B/N rows each give the same result as one rank holding B.
"""
import torch
import torch.nn as nn

from dinolite import distributed


def _global_logsumexp(x: torch.Tensor, dim) -> torch.Tensor:
    """log(sum(exp(x))) over `dim` and over all ranks (the reduced dims are kept, size 1).

    A rank may hold no rows at all (iBOT: no masked patch in its images); it then contributes
    nothing to the sums, and -inf to the max.
    """
    dims = (dim,) if isinstance(dim, int) else dim
    if any(x.shape[d] == 0 for d in dims):
        shift = x.new_full([1 if d in dims else n for d, n in enumerate(x.shape)], float("-inf"))
    else:
        shift = x.amax(dim=dim, keepdim=True)
    shift = distributed.all_reduce_max_(shift)
    sum_exp = distributed.all_reduce_sum_(torch.exp(x - shift).sum(dim=dim, keepdim=True))
    return torch.log(sum_exp) + shift


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp teacher targets: teacher_logits [B, K] -> probabilities [B, K] (fp32).

    Same result as the official algorithm (B = rows over all ranks, the K x B matrix Q):

        Q = exp(t / T)^T;  Q /= sum(Q)
        repeat n_iterations: Q /= row sums (per prototype, over all ranks); Q /= K
                             Q /= column sums (per sample);                Q /= B
        Q *= B;  return Q^T

    After the last iteration each sample's row sums to exactly 1 (up to rounding) and each
    prototype has received approximately 1/K of the batch's mass (exactly 1/K only in the
    limit of many iterations). Every step is done on log Q, so logits / T far above 88 (where
    exp overflows in fp32) give finite, correct results; wherever the official version is
    finite the two agree to fp32 rounding.
    """
    if teacher_logits.ndim != 2:
        raise ValueError(f"sinkhorn_knopp expects teacher logits [B, K], got shape {tuple(teacher_logits.shape)}; "
                         "flatten the crops into the batch dimension first")
    if not teacher_temp > 0:
        raise ValueError(f"teacher_temp must be > 0, got {teacher_temp}")
    if n_iterations < 0 or int(n_iterations) != n_iterations:
        raise ValueError(f"n_iterations must be a non-negative integer, got {n_iterations}")
    local_batch, num_prototypes = teacher_logits.shape
    # B is the number of rows over all ranks, counted rather than assumed to be local * world:
    # ranks hold different numbers of masked patches when this centres iBOT targets.
    # Counted on the logits' device (NCCL reduces only device tensors) and kept there: log B without a host sync.
    device = teacher_logits.device
    global_batch = distributed.all_reduce_sum_(torch.tensor(float(local_batch), device=device))
    log_b = torch.log(global_batch)
    log_k = torch.log(torch.tensor(float(num_prototypes), device=device))
    log_q = teacher_logits.float().t() / teacher_temp  # [K, B]
    log_q = log_q - _global_logsumexp(log_q, dim=(0, 1))  # Q /= sum(Q)
    for _ in range(int(n_iterations)):
        # Each prototype (row) gets total mass 1/K ...
        log_q = log_q - _global_logsumexp(log_q, dim=1) - log_k
        # ... then each sample (column) gets total mass 1/B. Columns live on one rank: no reduction.
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - log_b
    # Q *= B: each sample's column now sums to 1.
    return torch.exp(log_q + log_b).t()


def _apply_pending_before_saving(module, prefix, keep_vars):
    module.apply_pending_update()


class SoftmaxCenter(nn.Module):
    """EMA centering of the teacher logits (DINO; DINOv2's default for small models).

        probs = softmax((t - c) / T),   c <- momentum * c + (1 - momentum) * mean_batch(t)

    Call order in a training step, as officially:

        probs = center(teacher_logits, teacher_temp)   # 1. apply any pending update, then centre
        center.update(teacher_logits)                  # 2. record this batch's mean (pending)

    Across ranks the batch mean is the mean of each rank's own mean, every rank weighted equally. This is
    the official rule: DINOv2's DINO centre divides the all-reduced sum of the logits by local rows x world
    size (equal row counts on every rank, so it is the global mean), and its iBOT patch centre is updated
    with the masked patches as one [1, M, K] group, so it all-reduces each rank's mean over its M masked
    patches and divides by the world size. Ranks hold different numbers of masked patches, so this is not
    the mean over all patches; it is the same on every rank. A rank with no rows (no masked patch) has no
    mean: it is left out of the average (the official code would divide 0 by 0 there).

    Lag semantics: `update(t_n)` only records the batch mean (all-reduced over ranks; asynchronous when
    a process group is initialised, as DINOv2 does it). The EMA step with that mean is applied at
    the start of the next `__call__`, so batch n is centred with
        c_n = m * c_{n-1} + (1 - m) * mean(t_{n-1}),   c_0 = 0,
    i.e. with the means of batches 1 .. n-1 and never with its own. `state_dict()` (and
    `apply_pending_update()`) apply a pending update first, so a checkpoint taken between
    `update` and the next call already contains it and resuming is exact.

    `center` [1, K] is a persistent buffer (saved in the state dict).
    """

    def __init__(self, out_dim: int, momentum: float = 0.9):
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.out_dim, self.momentum = out_dim, momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        # [1, K + 1]: the sum over ranks of each rank's mean logits, then the number of ranks that had rows.
        self._pending_sum = None
        self._pending_work = None  # async all-reduce handle
        self.register_state_dict_pre_hook(_apply_pending_before_saving)

    def _check(self, teacher_logits: torch.Tensor) -> None:
        if teacher_logits.ndim != 2 or teacher_logits.shape[1] != self.out_dim:
            raise ValueError(f"expected teacher logits [B, {self.out_dim}], got shape {tuple(teacher_logits.shape)}")

    @torch.no_grad()
    def apply_pending_update(self) -> None:
        """Fold the batch mean recorded by the last `update` into the centre (no-op if none)."""
        if self._pending_sum is None:
            return
        if self._pending_work is not None:
            self._pending_work.wait()
        sum_of_means, ranks_with_rows = self._pending_sum[:, :-1], self._pending_sum[:, -1:]
        if ranks_with_rows.item() > 0:
            batch_mean = sum_of_means / ranks_with_rows
            self.center.mul_(self.momentum).add_(batch_mean.to(self.center.dtype), alpha=1 - self.momentum)
        self._pending_sum, self._pending_work = None, None

    @torch.no_grad()
    def forward(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """teacher_logits [B, K] -> probabilities softmax((t - c) / T) [B, K] in fp32."""
        self._check(teacher_logits)
        if not teacher_temp > 0:
            raise ValueError(f"teacher_temp must be > 0, got {teacher_temp}")
        self.apply_pending_update()
        return torch.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update(self, teacher_logits: torch.Tensor) -> None:
        """Record the batch mean of teacher_logits [B, K] (mean over ranks of each rank's mean); applied
        before the next centring. B may differ between ranks, and may be 0."""
        self._check(teacher_logits)
        self.apply_pending_update()  # never drop a batch if update is called twice in a row
        rows = teacher_logits.shape[0]
        rank_mean = teacher_logits.float().sum(dim=0, keepdim=True) / max(rows, 1)
        has_rows = rank_mean.new_full((1, 1), float(rows > 0))
        self._pending_sum = torch.cat([rank_mean, has_rows], dim=1)
        if distributed.is_enabled():
            self._pending_work = distributed.all_reduce_(self._pending_sum, async_op=True)
