"""Linear probe: a linear classifier on [CLS] (optionally with the mean patch token), a small sweep of learning
rate and weight decay validated on held-out rows; measures the linear separability of the global representation."""
import torch
import torch.nn.functional as F
from tqdm import tqdm  # a text bar: in a notebook a widget bar would leave an empty box in the built book

from dinolite.eval.knn import check_2d
from dinolite.schedules import cosine_schedule


def train_linear_sweep(x, y, num_classes, lrs, weight_decays, epochs, seed, progress=False, class_weights=None):
    """Train one linear classifier per (lr, wd) pair at once, full batch, AdamW + cosine schedule.

    x [N, D] (standardised), y [N] -> weights [G, D, C], biases [G, C] for the G pairs.
    class_weights [C]: weighted cross-entropy (sum of w_y * loss over rows, divided by N).
    The G classifiers are independent (the loss is their sum, so each gets its own gradient);
    stacking them turns G small trainings into one, which matters on a CPU where tiny
    problems are dominated by per-step overhead. AdamW is written out because each
    classifier has its own lr and weight decay (decay on the weights, not the bias).
    """
    G = len(lrs)
    generator = torch.Generator().manual_seed(seed)
    weight = (0.01 * torch.randn(x.shape[1], num_classes, generator=generator)).repeat(G, 1, 1).requires_grad_()
    bias = torch.zeros(G, num_classes, requires_grad=True)
    lr0 = torch.tensor(lrs, dtype=torch.float32)
    wd = torch.tensor(weight_decays, dtype=torch.float32)
    state = [(torch.zeros_like(p), torch.zeros_like(p)) for p in (weight, bias)]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for step in tqdm(range(1, epochs + 1), desc="linear probe", disable=not progress):
        logits = torch.einsum("nd,gdc->gnc", x, weight) + bias[:, None, :]
        loss = F.cross_entropy(logits.reshape(-1, num_classes), y.repeat(G), weight=class_weights,
                               reduction="sum") / x.shape[0]
        grads = torch.autograd.grad(loss, (weight, bias))
        lr = lr0 * cosine_schedule(step - 1, epochs, start=1.0, end=0.0)
        with torch.no_grad():
            for p, g, (m, v), decay in ((weight, grads[0], state[0], wd), (bias, grads[1], state[1], torch.zeros_like(wd))):
                shape = (G,) + (1,) * (p.ndim - 1)
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                p.mul_(1 - (lr * decay).view(shape))
                update = (m / (1 - beta1**step)) / ((v / (1 - beta2**step)).sqrt() + eps)
                p.sub_(lr.view(shape) * update)
    return weight.detach(), bias.detach()


def head_from(weight, bias):
    head = torch.nn.Linear(weight.shape[0], weight.shape[1])
    with torch.no_grad():
        head.weight.copy_(weight.T)
        head.bias.copy_(bias)
    return head


def _accuracy(head, x, y):
    with torch.no_grad():
        return 100.0 * (head(x).argmax(-1) == y).float().mean().item()


class LinearProbe(torch.nn.Module):
    """Standardise features with training statistics, then a linear layer. forward: [N, D] -> [N, C]."""

    def __init__(self, mean, std, head):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.head = head

    def forward(self, x):
        return self.head((x - self.mean) / self.std)


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int | None = None,
    lrs=(1e-3, 1e-2, 1e-1),
    weight_decays=(0.0, 1e-3, 1e-1),
    epochs: int = 100,
    val_fraction: float = 0.2,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Linear classifier on frozen features with a small lr / weight-decay sweep.

    Features [N, D] are standardised with the training mean/std (an affine map, so the probe is
    still linear in the raw features). Each (lr, wd) is trained full-batch with AdamW and a cosine
    schedule on (1 - val_fraction) of the training set and scored on the held-out rest; the best
    pair is retrained on the whole training set and evaluated on the test set. All pairs of the
    sweep train together as one stacked tensor (see _train_linear_sweep).
    Returns dict(top1 (percent), val_top1, lr, weight_decay, probe (LinearProbe), sweep).
    """
    x, xt = check_2d(train_features, "train_features"), check_2d(test_features, "test_features")
    y, yt = torch.as_tensor(train_labels).long().cpu(), torch.as_tensor(test_labels).long().cpu()
    if x.shape[0] != y.shape[0] or xt.shape[0] != yt.shape[0]:
        raise ValueError("features and labels must have the same number of rows")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    num_classes = int(max(y.max(), yt.max())) + 1 if num_classes is None else num_classes
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    xs, xts = (x - mean) / std, (xt - mean) / std

    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(val_fraction * x.shape[0])))
    val_idx, fit_idx = perm[:n_val], perm[n_val:]
    grid = [(lr, wd) for lr in lrs for wd in weight_decays]
    weights, biases = train_linear_sweep(xs[fit_idx], y[fit_idx], num_classes, [g[0] for g in grid], [g[1] for g in grid], epochs, seed, progress)
    sweep = {pair: _accuracy(head_from(weights[i], biases[i]), xs[val_idx], y[val_idx]) for i, pair in enumerate(grid)}
    (lr, wd), val_top1 = max(sweep.items(), key=lambda item: item[1])  # first best on ties
    weights, biases = train_linear_sweep(xs, y, num_classes, [lr], [wd], epochs, seed, progress)
    head = head_from(weights[0], biases[0])
    return {
        "top1": _accuracy(head, xts, yt),
        "val_top1": val_top1,
        "lr": lr,
        "weight_decay": wd,
        "probe": LinearProbe(mean, std, head),
        "sweep": sweep,
    }
