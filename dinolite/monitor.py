"""Collapse monitors: cheap numbers that tell a healthy DINO run from a collapsed one.

Self-distillation has two trivial solutions and the loss alone does not always show which one
a run fell into:

- uniform collapse: the teacher predicts the same flat distribution 1/K for every image. Every
  per-sample entropy is ln K and the loss sits at ln K (11.09 for K = 65536, 8.318 for K = 4096).
- one-hot collapse: every image goes to the same prototype. Per-sample entropy ~ 0, and so is the
  entropy of the batch-mean prediction (only one prototype in use); the loss goes to ~0.

A healthy teacher is sharp per sample (low per-sample entropy) but spreads the batch over many
prototypes (high entropy of the mean prediction). On the backbone features, collapse shows as a
tiny per-dimension spread of the L2-normalised [CLS] features (healthy: about 1/sqrt(D)) and a
small effective rank.

All metric functions are pure, take tensors and return 0-dim float32 tensors (no gradient).
`diagnose` turns metrics into a warning that names the symptom, the usual causes and the fixes;
`CollapseMonitor` keeps a history and only warns when a symptom persists.
"""
import math

import torch
import torch.nn.functional as F


def _check_probs(probs: torch.Tensor, name: str = "probs") -> torch.Tensor:
    if probs.ndim != 2:
        raise ValueError(f"{name} must be [B, K] probabilities, got shape {tuple(probs.shape)}")
    probs = probs.detach().float()
    row_sums = probs.sum(dim=-1)
    if not torch.allclose(row_sums, torch.ones_like(row_sums), atol=1e-3) or (probs < 0).any():
        raise ValueError(
            f"{name} rows must be probability distributions (non-negative, summing to 1); "
            "pass softmax/Sinkhorn-Knopp outputs, not logits"
        )
    return probs


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy in nats along the last dim, with 0 log 0 = 0."""
    return -torch.special.xlogy(probs, probs).sum(dim=-1)


@torch.no_grad()
def teacher_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean per-sample entropy (nats) of teacher probabilities [B, K].

    ln K for a uniform teacher (uniform collapse), 0 for one-hot rows. A healthy teacher is
    sharp: well below ln K.
    """
    return _entropy(_check_probs(probs)).mean()


@torch.no_grad()
def mean_prediction_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the batch-mean teacher prediction, probs [B, K] -> scalar.

    exp() of it is the effective number of prototypes the batch uses. It is ~0 when every sample
    lands on the same prototype (one-hot collapse) and at most min(ln K, ln B + mean per-sample
    entropy) otherwise. Always >= teacher_entropy (entropy is concave).
    """
    return _entropy(_check_probs(probs).mean(dim=0))


@torch.no_grad()
def kl_teacher_student(teacher_probs: torch.Tensor, student_logits: torch.Tensor, student_temp: float = 0.1) -> torch.Tensor:
    """Mean over the batch of KL(P_t || softmax(z_s / student_temp)).

    teacher_probs [B, K], student_logits [B, K]. The DINO loss equals this KL plus the teacher
    entropy, so KL ~ 0 with teacher entropy ~ ln K means both networks output the uniform
    distribution (the loss is then flat at ln K).
    """
    teacher_probs = _check_probs(teacher_probs, "teacher_probs")
    if student_logits.shape != teacher_probs.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_probs {tuple(teacher_probs.shape)} must have the same shape"
        )
    log_student = F.log_softmax(student_logits.detach().float() / student_temp, dim=-1)
    return (torch.special.xlogy(teacher_probs, teacher_probs) - teacher_probs * log_student).sum(dim=-1).mean()


def _check_features(features: torch.Tensor) -> torch.Tensor:
    if features.ndim != 2:
        raise ValueError(f"features must be [B, D], got shape {tuple(features.shape)}; pass the [CLS] tokens")
    if features.shape[0] < 2:
        raise ValueError("need at least 2 samples to measure a spread across the batch")
    return features.detach().float()


@torch.no_grad()
def per_dim_std(features: torch.Tensor) -> torch.Tensor:
    """Mean over dimensions of the batch std of L2-normalised features [B, D].

    Unit vectors spread evenly over the sphere have per-dimension std ~ 1/sqrt(D); a collapsed
    representation (every image mapped to the same direction) gives ~0.
    """
    unit = F.normalize(_check_features(features), dim=-1)
    return unit.std(dim=0).mean()


@torch.no_grad()
def effective_rank(features: torch.Tensor, center: bool = False) -> torch.Tensor:
    """Effective rank (Roy & Vetterli 2007) of features [B, D]: exp(entropy(s / sum(s))).

    s are the singular values of the feature matrix. Between 1 and min(B, D); equal to r for r
    equal non-zero singular values. Not centred by default (as in RankMe), so a constant
    feature vector has effective rank 1; center=True subtracts the batch mean first.
    A matrix of zeros has effective rank 0 by convention.
    """
    x = _check_features(features)
    if center:
        x = x - x.mean(dim=0, keepdim=True)
    s = torch.linalg.svdvals(x.double())
    total = s.sum()
    if total <= 0:
        return torch.zeros((), dtype=torch.float32)
    p = s / total
    return torch.exp(-torch.special.xlogy(p, p).sum()).float()


@torch.no_grad()
def collapse_metrics(teacher_probs=None, student_logits=None, student_temp: float = 0.1, features=None) -> dict:
    """All metrics that the given inputs allow, as Python floats.

    Keys: teacher_entropy, mean_prediction_entropy, num_prototypes (K), batch_size (B) from
    teacher_probs [B, K]; kl from student_logits [B, K] too; per_dim_std, effective_rank,
    embed_dim (D), num_features from features [B, D].
    """
    metrics = {}
    if teacher_probs is not None:
        metrics["teacher_entropy"] = teacher_entropy(teacher_probs).item()
        metrics["mean_prediction_entropy"] = mean_prediction_entropy(teacher_probs).item()
        metrics["batch_size"], metrics["num_prototypes"] = teacher_probs.shape
        if student_logits is not None:
            metrics["kl"] = kl_teacher_student(teacher_probs, student_logits, student_temp).item()
    elif student_logits is not None:
        raise ValueError("kl needs teacher_probs too")
    if features is not None:
        metrics["per_dim_std"] = per_dim_std(features).item()
        metrics["effective_rank"] = effective_rank(features).item()
        metrics["num_features"], metrics["embed_dim"] = features.shape
    return metrics


UNIFORM_FIX = (
    "Usual causes: the teacher temperature is too high or the teacher output is not sharpened "
    "(use 0.04 warming up to 0.07, below the student's 0.1); the centre is over-weighted; "
    "the teacher is the same object as the student instead of an EMA copy (copy.deepcopy, "
    "requires_grad_(False), update with ema_update_); the learning rate is too high."
)
ONE_HOT_FIX = (
    "Usual causes: centering is missing or never updated (SoftmaxCenter.update each step, or "
    "Sinkhorn-Knopp); the teacher temperature is too low for too long; the teacher momentum "
    "is too low for a small batch (try 0.9995) so the teacher chases the student; the "
    "learning rate is too high; the teacher is the same object as the student."
)
RANK_FIX = (
    "Usual causes: the teacher is the same object as the student (no stop-gradient); the "
    "learning rate is too high or warm-up too short; the batch is too small for batch "
    "statistics (centering, Sinkhorn-Knopp, KoLeo: gradient accumulation does not help); "
    "KoLeo (weight 0.1) is off."
)


def diagnose(
    metrics: dict,
    loss: float | None = None,
    num_prototypes: int | None = None,
    uniform_fraction: float = 0.9,
    one_hot_prototypes: float = 2.0,
    loss_tolerance: float = 0.02,
    zero_loss: float = 0.01,
    std_fraction: float = 0.2,
    rank_fraction: float = 0.05,
) -> str | None:
    """Name the collapse that `metrics` (from collapse_metrics) and `loss` show, or return None.

    Rules (K prototypes, D dims, B samples):
      uniform collapse:  teacher_entropy > uniform_fraction * ln K, or loss within
                         loss_tolerance * ln K of ln K;
      one-hot collapse:  exp(mean_prediction_entropy) < one_hot_prototypes (the whole batch uses
                         fewer than ~2 prototypes; checked for B >= 4), or loss < zero_loss;
      feature collapse:  per_dim_std < std_fraction / sqrt(D), or
                         effective_rank < max(1.5, rank_fraction * min(B, D)).
    Early in training the loss is close to ln K by construction, so call this after warm-up or
    use CollapseMonitor, which requires a symptom to persist.
    """
    K = metrics.get("num_prototypes", num_prototypes)
    findings = []
    uniform = []
    if "teacher_entropy" in metrics and K and K > 1 and metrics["teacher_entropy"] > uniform_fraction * math.log(K):
        uniform.append(f"teacher entropy {metrics['teacher_entropy']:.3f} nats is close to ln K = {math.log(K):.3f}")
    if loss is not None and K and K > 1 and abs(loss - math.log(K)) < loss_tolerance * math.log(K):
        uniform.append(f"loss {loss:.3f} is flat at ln K = {math.log(K):.3f}")
    if uniform:
        findings.append("UNIFORM COLLAPSE: the teacher predicts ~1/K for every image (" + "; ".join(uniform) + "). " + UNIFORM_FIX)

    one_hot = []
    batch_ok = metrics.get("batch_size", 0) >= 4  # with 1-3 samples few prototypes in use is normal
    if batch_ok and "mean_prediction_entropy" in metrics and math.exp(metrics["mean_prediction_entropy"]) < one_hot_prototypes:
        one_hot.append(
            f"the whole batch uses exp(H(mean prediction)) = {math.exp(metrics['mean_prediction_entropy']):.2f} prototypes"
            f" (per-sample entropy {metrics.get('teacher_entropy', float('nan')):.3f})"
        )
    if loss is not None and loss < zero_loss:
        one_hot.append(f"loss {loss:.4f} is ~0")
    if one_hot:
        findings.append("ONE-HOT COLLAPSE: every image goes to the same prototype (" + "; ".join(one_hot) + "). " + ONE_HOT_FIX)

    feature = []
    if "per_dim_std" in metrics:
        D = metrics["embed_dim"]
        if metrics["per_dim_std"] < std_fraction / math.sqrt(D):
            feature.append(f"per-dim std of normalised features {metrics['per_dim_std']:.4f} << 1/sqrt(D) = {1 / math.sqrt(D):.4f}")
    if "effective_rank" in metrics:
        limit = max(1.5, rank_fraction * min(metrics["num_features"], metrics["embed_dim"]))
        if metrics["effective_rank"] < limit:
            feature.append(f"effective rank {metrics['effective_rank']:.2f} < {limit:.2f} of D = {metrics['embed_dim']}")
    if feature:
        findings.append("FEATURE (RANK) COLLAPSE: the backbone maps images to a low-dimensional set (" + "; ".join(feature) + "). " + RANK_FIX)
    return "\n".join(findings) if findings else None


def check_teacher(teacher: torch.nn.Module, student: torch.nn.Module) -> str | None:
    """Warn when the teacher is not an independent, frozen copy of the student.

    Catches the most common bug: `teacher = student` (same object) or shared parameter tensors,
    and a teacher whose parameters still require gradients.
    """
    if teacher is student:
        return "the teacher is the same object as the student: use teacher = copy.deepcopy(student) and update it by EMA"
    student_ptrs = {p.data_ptr() for p in student.parameters()}
    shared = [n for n, p in teacher.named_parameters() if p.data_ptr() in student_ptrs]
    if shared:
        return f"teacher shares {len(shared)} parameter tensors with the student (e.g. {shared[0]}): copy.deepcopy the student"
    trainable = [n for n, p in teacher.named_parameters() if p.requires_grad]
    if trainable:
        return f"{len(trainable)} teacher parameters require grad (e.g. {trainable[0]}): call teacher.requires_grad_(False)"
    return None


class CollapseMonitor:
    """Log collapse metrics every step and warn once a symptom persists for `patience` updates.

    monitor = CollapseMonitor(num_prototypes=K)
    warning = monitor.update(loss=loss.item(), teacher_probs=P_t, student_logits=z_s, features=cls)
    if warning: print(warning)
    `history` holds one metrics dict per update (with "step" and "loss").
    """

    def __init__(self, num_prototypes: int | None = None, patience: int = 5, warmup_steps: int = 0, student_temp: float = 0.1, **thresholds):
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.num_prototypes = num_prototypes
        self.patience = patience
        self.warmup_steps = warmup_steps
        self.student_temp = student_temp
        self.thresholds = thresholds
        self.history = []
        self.last_warning = None
        self._streak = 0

    def update(self, loss=None, teacher_probs=None, student_logits=None, features=None, step: int | None = None) -> str | None:
        step = len(self.history) if step is None else step
        if teacher_probs is not None and self.num_prototypes is not None and teacher_probs.shape[-1] != self.num_prototypes:
            raise ValueError(f"teacher_probs has {teacher_probs.shape[-1]} prototypes, monitor was built for {self.num_prototypes}")
        metrics = collapse_metrics(teacher_probs, student_logits, self.student_temp, features)
        loss = float(loss) if loss is not None else None
        metrics.update(step=step, loss=loss)
        self.history.append(metrics)
        finding = diagnose(metrics, loss=loss, num_prototypes=self.num_prototypes, **self.thresholds)
        if finding is None or step < self.warmup_steps:
            self._streak = 0
            return None
        self._streak += 1
        if self._streak >= self.patience:
            self.last_warning = f"step {step}: " + finding
            return self.last_warning
        return None


FALLING_QUALITY_CAUSES = (
    "usual causes: a learning rate too high for the depth (lower optim.base_lr), a teacher too soft "
    "(lower loss.teacher_temp), or too few steps for the warm-ups (optim.warmup_epochs and "
    "loss.warmup_teacher_temp_epochs against train.epochs)")


class BelowStartWarning:
    """Says when a measure that training should raise (the teacher's kNN accuracy, the effective rank of
    the features) has stayed below its first value for `patience` evaluations in a row, once per run.

    The first value passed to `update` is the reference: the network at initialisation for kNN (the
    loop evaluates step 0), the first monitor step for the rank. A value counts as below when it is under
    `fraction` x the reference. The loop uses 1 for kNN and 0.5 for the effective rank: healthy tiny runs
    dip in rank before it grows (measured on textures: tiny-cpu 16.3 -> 15.2, small-photos as it was before
    issue 21 (base lr 0.01, KoLeo 0.5) 30.4 -> 22.1, then both end higher), while dimensional collapse takes
    it to a few dimensions. Teacher entropy is not watched this way: falling from uniform is what it should do.
    """

    def __init__(self, name: str, patience: int = 2, fraction: float = 1.0):
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        self.name, self.patience, self.fraction = name, patience, fraction
        self.start = None  # the reference value
        self.below = 0  # evaluations in a row below it
        self.warned = False

    def update(self, value: float, step: int) -> str | None:
        """Record `value` at `step`; returns the warning the first time the streak reaches `patience`."""
        if self.start is None:
            self.start = float(value)
            return None
        self.below = self.below + 1 if value < self.fraction * self.start else 0
        if self.below < self.patience or self.warned:
            return None
        self.warned = True
        below = "below its first value" if self.fraction == 1 else f"below {self.fraction:g} x its first value"
        return (f"step {step}: {self.name} is {value:.4g}, {below} {self.start:.4g} for "
                f"{self.below} evaluations in a row: the network is getting worse than where it started; "
                + FALLING_QUALITY_CAUSES)
