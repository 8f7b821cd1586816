"""The training step (a plain function) and the training loop (resume, logs, checkpoints, export).

    arch = train(get_config("tiny-cpu"), "builtin:n=2000,size=32", output_dir="runs/tiny")

Exact resume: every random number of step s (batch contents, augmentations, masks, drop path)
is derived from (seed, step, rank), every schedule is a function of s, and a checkpoint holds
student, teacher, optimiser and centering state. So a run stopped after step s and resumed
continues bitwise like an uninterrupted one (on CPU; CUDA kernels may be non-deterministic).
"""
import contextlib
import functools
import json
import math
import os
import time
import warnings

import torch

from dinolite import distributed
from dinolite.ema import ema_update_
from dinolite.monitor import BelowStartWarning, CollapseMonitor, check_teacher
from dinolite.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    remove_stale_temp_files,
    resolve_checkpoint,
    save_checkpoint,
)
from dinolite.train.config import Config, config_diff, config_from_dict, config_to_dict, load_config, save_config
from dinolite.train.data import _MODEL, StepBatches, derive_seed, move_batch
from dinolite.train.meta_arch import DINOv2MetaArch
from dinolite.train.optim import StepValues, apply_schedule_, build_optimizer, schedule_values
from dinolite.train.precision import describe_precision, resolve_precision

# Run-control keys that may change when resuming: they do not change what is computed.
RESUMABLE_KEYS = {
    "train.device", "train.num_workers", "train.threads", "train.progress", "train.tensorboard",
    "train.log_every", "train.checkpoint_every", "train.keep_last", "train.monitor_every", "train.knn_every",
}
# Below this many images per rank and step, batch statistics (Sinkhorn-Knopp columns, KoLeo
# nearest neighbours, the centre) get noisy; we warn.
SMALL_BATCH = 32


class OutputDirError(ValueError):
    """The output directory cannot be used for this run (a different config is saved there, or it is a file)."""


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one, e.g. under taskset)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def intra_op_threads(threads: int, num_workers: int) -> int:
    """Threads for the training process's own ops: `threads`, or for 0 (auto) the cores the data workers leave.

    Each DataLoader worker is a process that keeps one core busy decoding and augmenting. With
    more compute threads than free cores, the threads of one op wait on each other while the
    workers hold their cores, and a step can take several times longer. Auto never exceeds
    torch's current setting, so OMP_NUM_THREADS or an earlier torch.set_num_threads still caps it.
    """
    if threads > 0:
        return threads
    return max(1, min(torch.get_num_threads(), available_cores() - num_workers))


def _one_thread_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: one compute thread per worker (the training process sizes its own).

    PyTorch's worker loop sets one thread as well; saying it here keeps the whole thread budget in one file.
    """
    torch.set_num_threads(1)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_autocast(device: torch.device, precision: str):
    """A no-argument context factory: bf16 autocast on CPU or CUDA, or nothing for fp32 ("auto": see
    dinolite.train.precision.resolve_precision)."""
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)


def train_step(arch: DINOv2MetaArch, optimizer: torch.optim.Optimizer, batch: dict, step: int,
               values: StepValues, seed: int = 0, clip_grad: float = 3.0, rank: int = 0,
               autocast=contextlib.nullcontext) -> dict:
    """One optimiser step: losses, backward, clip, AdamW, EMA of the teacher.

    Args:
        arch: the meta-architecture (student, teacher, centering state).
        optimizer: AdamW over `build_param_groups(arch.student)`.
        batch: collate_multicrop dict on the training device.
        step: the global step number (seeds drop path: torch RNG <- (seed, step, rank)).
        values: this step's lr / weight decay / teacher momentum / teacher temperature.
    Returns the loss terms and monitor tensors of `arch.forward_losses`, plus grad_norm.
    """
    torch.manual_seed(derive_seed(seed, step, rank, _MODEL))
    arch.train()
    apply_schedule_(optimizer, values)
    optimizer.zero_grad(set_to_none=True)
    if arch.gram_teacher is not None:
        arch.gram_teacher.maybe_refresh(step, arch.teacher.backbone)  # before the step, as officially
    out = arch.forward_losses(batch, values.teacher_temp, autocast, values.gram_weight, values.local_dino_weight)
    out["loss"].backward()
    params = [p for p in arch.student.parameters() if p.grad is not None]
    max_norm = clip_grad if clip_grad > 0 else math.inf
    out["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, max_norm).detach()
    optimizer.step()
    ema_update_(arch.teacher, arch.student, values.momentum)
    out["loss"] = out["loss"].detach()
    return out


# ---------------------------------------------------------------------------------------
# checkpoints


def training_state(arch: DINOv2MetaArch, optimizer, step: int, cfg: Config) -> dict:
    """Everything needed to continue after `step` completed steps."""
    return {
        "step": step,
        "student": arch.student.state_dict(),
        "teacher": arch.teacher.state_dict(),
        "centers": {name: getattr(arch, name).state_dict() for name in ("dino_center", "ibot_center")
                    if hasattr(arch, name)},
        "optimizer": optimizer.state_dict(),
        "config": config_to_dict(cfg),
        # weights (refreshed copies differ from the file it was loaded from) and the refresh count
        "gram_teacher": None if arch.gram_teacher is None else arch.gram_teacher.state_dict(),
    }


def _load_student_teacher_optimizer(state: dict, arch: DINOv2MetaArch, optimizer) -> None:
    """Student, teacher, centring state and (when the checkpoint has it) optimiser state, strictly."""
    arch.student.load_state_dict(state["student"], strict=True)
    arch.teacher.load_state_dict(state["teacher"], strict=True)
    for name, center_state in state["centers"].items():
        getattr(arch, name).load_state_dict(center_state, strict=True)
    if "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])


def restore_training_state(state: dict, arch: DINOv2MetaArch, optimizer) -> int:
    """Load `state` (strictly) into arch and optimizer; returns the number of completed steps."""
    _load_student_teacher_optimizer(state, arch, optimizer)
    if arch.gram_teacher is not None:
        arch.gram_teacher.load_state_dict(state["gram_teacher"], strict=True)
    return int(state["step"])


def continue_training_state(state: dict, arch: DINOv2MetaArch, optimizer, source: str) -> int:
    """Start a new run (a new config) from another run's checkpoint: its student, teacher, centering and
    optimiser state and its step count, as DINOv3's Gram-anchoring stage continues the pre-training
    run. The Gram teacher is not taken from it (see gram.teacher). A checkpoint saved without optimiser
    state (a smaller file: dinolite.train.checkpoint.weights_only_state) starts AdamW afresh. Returns the
    step to start at."""
    try:
        if any(hasattr(arch, name) != (name in state["centers"]) for name in ("dino_center", "ibot_center")):
            raise ValueError("loss.centering differs")
        _load_student_teacher_optimizer(state, arch, optimizer)
    except (KeyError, RuntimeError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{source} does not fit this config ({first_line}): continue with the same "
                              "model, head and centering settings as that run") from None
    return int(state["step"])


def _first_logged(output_dir: str | None, key: str) -> float | None:
    """The first value of `key` in output_dir/metrics.jsonl (None if there is none)."""
    path = os.path.join(output_dir or "", "metrics.jsonl")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return next((record[key] for record in map(json.loads, f) if key in record), None)


def _check_resume_config(output_dir: str, cfg: Config) -> None:
    saved_path = os.path.join(output_dir, "config.yaml")
    if not os.path.exists(saved_path):
        return
    saved = load_config(saved_path)
    diff = {k: v for k, v in config_diff(saved, cfg).items() if k not in RESUMABLE_KEYS}
    if diff:
        lines = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise OutputDirError(f"{output_dir} holds a run with a different config ({lines}). Resume with the "
                             f"same config, or use a new --output-dir. Only these keys may change on resume: "
                             f"{', '.join(sorted(RESUMABLE_KEYS))}")


# ---------------------------------------------------------------------------------------
# kNN evaluation data


_TORCHVISION_KINDS = ("cifar10", "stl10", "imagenette")  # --data kinds with their own test split


def knn_datasets(data, cfg: Config):
    """(train, held-out) datasets of (image tensor, label) for kNN, or None when there are no labels.

    Images are resized and centre-cropped to crops.global_size. Built-in SyntheticShapes and
    SyntheticTextures: the held-out split is the same generator with another seed (new images,
    same classes); torchvision datasets: their test split.
    """
    from dinolite.data import EvalTransform, SyntheticShapes, SyntheticTextures, build_dataset

    size = cfg.crops.global_size
    transform = EvalTransform(resize_size=size, crop_size=size)
    t = cfg.train
    if isinstance(data, (SyntheticShapes, SyntheticTextures)):
        n_train = t.knn_train_size or len(data)
        n_test = t.knn_test_size or max(1, len(data) // 5)
        no_masks = {"return_mask": False} if isinstance(data, SyntheticShapes) else {}
        train_set = data.replace(num_images=min(n_train, len(data)), transform=transform, **no_masks)
        test_set = data.replace(num_images=n_test, seed=data.seed + 1_000_003, transform=transform, **no_masks)
        return train_set, test_set
    if isinstance(data, str) and data.split(":")[0] in _TORCHVISION_KINDS:
        train_set = build_dataset(data, transform=transform, train=True)
        test_set = build_dataset(data, transform=transform, train=False)
        if t.knn_train_size:
            train_set = torch.utils.data.Subset(train_set, range(min(t.knn_train_size, len(train_set))))
        if t.knn_test_size:
            test_set = torch.utils.data.Subset(test_set, range(min(t.knn_test_size, len(test_set))))
        return train_set, test_set
    return None


@torch.no_grad()
def knn_accuracy(backbone, knn_data, k: int = 20, batch_size: int = 256) -> float:
    """Top-1 kNN accuracy (%) of `backbone`'s [CLS] features: train split as memory, held-out as queries."""
    from dinolite.eval import extract_features, knn_classify

    train_set, test_set = knn_data
    train_feats = extract_features(backbone, train_set, batch_size=batch_size, progress=False)
    test_feats = extract_features(backbone, test_set, batch_size=batch_size, progress=False)
    result = knn_classify(train_feats["cls"], train_feats["labels"], test_feats["cls"], test_feats["labels"], k=k)
    return result["top1"]


# ---------------------------------------------------------------------------------------
# the loop


class _Logger:
    """metrics.jsonl (+ TensorBoard when available and asked for) and an in-memory history."""

    def __init__(self, output_dir, tensorboard: bool, enabled: bool):
        self.history = []
        self.path = os.path.join(output_dir, "metrics.jsonl") if (output_dir and enabled) else None
        self.writer = None
        if tensorboard and self.path:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))
            except ImportError:
                warnings.warn("train.tensorboard=true but tensorboard is not installed; "
                              "logging to metrics.jsonl only (pip install tensorboard)", stacklevel=4)

    def log(self, record: dict):
        self.history.append(record)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.writer:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self):
        if self.writer:
            self.writer.close()


def _small_batch_warning(cfg: Config, world_size: int) -> str | None:
    B = cfg.train.batch_size
    if B >= SMALL_BATCH:
        return None
    return (f"train.batch_size={B} images per rank is small (< {SMALL_BATCH}): Sinkhorn-Knopp, the centre "
            f"and KoLeo use in-batch statistics (KoLeo's nearest neighbours among only {B} images; SK spreads "
            f"{2 * B * world_size} teacher rows over {cfg.head.dino_out_dim} prototypes). Gradient accumulation "
            "does NOT fix this. Remedies: a larger batch if memory allows; a slower teacher "
            "(optim.momentum_teacher=0.9995); fewer prototypes (head.dino_out_dim, head.ibot_out_dim); "
            "the sqrt rule already lowers the lr for small batches.")


def train(cfg: Config, data, output_dir: str | None = None, stop_at_step: int | None = None,
          knn_data="auto", device=None, progress: bool | None = None,
          continue_from: str | None = None) -> DINOv2MetaArch:
    """Train DINOv2 with `cfg` on `data` and return the meta-architecture (teacher and student).

    Args:
        cfg: a Config (get_config("tiny-cpu"), apply_overrides, ...).
        data: a --data spec string ("builtin:n=2000,size=32", "imagenette:ROOT", ...) or a dataset
            whose items are an image or (image, label).
        output_dir: checkpoints, config.yaml, metrics.jsonl, teacher_backbone_official.pth; a
            directory that already holds checkpoints is resumed (the config must match). None:
            nothing is written and nothing resumed.
        stop_at_step: stop after this many completed steps (the schedules still span the whole
            run), e.g. to simulate an interruption; a checkpoint is written there.
        knn_data: "auto" (a labelled held-out split when the data has one, see knn_datasets),
            None (no kNN), or a (train, held-out) pair of labelled datasets.
        device, progress: override cfg.train.device / cfg.train.progress.
        continue_from: "RUN_DIR", "RUN_DIR@STEP" or a checkpoint file: when output_dir holds no checkpoint
            yet, start from that checkpoint's weights, optimiser state and step with this (new) config,
            e.g. a Gram-anchoring stage after pre-training. Ignored once output_dir has a checkpoint (resume).
    The returned module has `history`: the list of logged records (also in metrics.jsonl).
    It runs with intra_op_threads(cfg.train.threads, cfg.train.num_workers) compute threads and
    restores the previous number afterwards.
    """
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(intra_op_threads(cfg.train.threads, cfg.train.num_workers))
    try:
        return _train(cfg, data, output_dir, stop_at_step, knn_data, device, progress, continue_from)
    finally:
        torch.set_num_threads(previous_threads)


def _parse_run_and_step(source: str) -> tuple[str, int | None]:
    """"runs/x@200" -> ("runs/x", 200); anything else -> (source, None)."""
    run, _, step = source.rpartition("@")
    return (run, int(step)) if run and step.isdigit() else (source, None)


def _train(cfg: Config, data, output_dir, stop_at_step, knn_data, device, progress,
           continue_from=None) -> DINOv2MetaArch:
    from dinolite.data import build_dataset

    if cfg.teacher.checkpoint:  # distillation from a frozen teacher (dinolite.train.distill)
        from dinolite.train.distill import train_distill
        return train_distill(cfg, data, output_dir, stop_at_step, knn_data, device, progress,
                             continue_from=continue_from)
    t = cfg.train
    device = resolve_device(device or t.device)
    progress = t.progress if progress is None else progress
    rank, world_size = distributed.get_rank(), distributed.get_world_size()
    if world_size > 1:
        # The losses, data sharding and seeds are rank-aware, but nothing here synchronises the
        # student's gradients: that is the job of the data-parallel / FSDP2 wrapper (scale/).
        raise NotImplementedError("dinolite.train.train runs in a single process; wrap the student for "
                                  f"data-parallel training before using {world_size} processes")
    is_main = rank == 0
    dataset = build_dataset(data) if isinstance(data, str) else data
    if knn_data == "auto":
        has_test_split = isinstance(data, str) and data.split(":")[0] in _TORCHVISION_KINDS
        knn_data = knn_datasets(data if has_test_split else dataset, cfg)
    global_batch = t.batch_size * world_size
    epoch_length = t.epoch_length or max(1, len(dataset) // global_batch)
    total_steps = t.epochs * epoch_length
    warning = _small_batch_warning(cfg, world_size)
    if warning and is_main:
        warnings.warn(warning, stacklevel=3)

    # Model and optimiser (the init is seeded so that the same seed gives the same network).
    torch.manual_seed(t.seed)
    arch = DINOv2MetaArch(cfg, device=device)
    problem = check_teacher(arch.teacher, arch.student)
    if problem:
        raise RuntimeError(problem)
    optimizer = build_optimizer(arch.student, cfg)

    start_step = 0
    if output_dir:
        if os.path.exists(output_dir) and not os.path.isdir(output_dir):
            raise OutputDirError(f"output directory {output_dir} is a file; give the path of a directory "
                                 "(it is created if missing)")
        try:
            os.makedirs(output_dir, exist_ok=True)
        except OSError as e:
            raise OutputDirError(f"cannot create output directory {output_dir} ({e.strerror}: {e.filename}); "
                                 "give a path you can write to") from None
        if is_main:
            for stale in remove_stale_temp_files(output_dir):
                print(f"removed {stale}: the temporary file of a checkpoint save that never finished")
        path = latest_checkpoint(output_dir)
        if path:
            # Only a directory with a checkpoint holds a run to continue; without one, a run that
            # failed early (e.g. batch too large for the data) is retried with the new config.
            _check_resume_config(output_dir, cfg)
            state = load_checkpoint(path, map_location=device)
            bad = {k: v for k, v in config_diff(config_from_dict(state["config"]), cfg).items()
                   if k not in RESUMABLE_KEYS}
            if bad:
                raise OutputDirError(f"checkpoint {path} was trained with another config: {bad}. Resume with "
                                     "that config, or use a new --output-dir")
            start_step = restore_training_state(state, arch, optimizer)
            if is_main:
                print(f"resuming from step {start_step} (checkpoint {path})")
    if continue_from and start_step == 0:
        source = resolve_checkpoint(*_parse_run_and_step(continue_from))
        start_step = continue_training_state(load_checkpoint(source, map_location=device), arch, optimizer, source)
        if start_step >= total_steps:
            raise CheckpointError(f"{source} is at step {start_step} but this config ends at step {total_steps}: "
                                  "raise train.epochs to train further")
        if is_main:
            print(f"continuing from step {start_step} of {source} with the new config")
    batches = StepBatches(dataset, cfg, total_steps, start_step, rank, world_size)  # checks the data size
    if output_dir and is_main:
        save_config(cfg, os.path.join(output_dir, "config.yaml"))
        if start_step == 0 and os.path.exists(os.path.join(output_dir, "metrics.jsonl")):
            os.remove(os.path.join(output_dir, "metrics.jsonl"))  # left by a run that never checkpointed
    end_step = total_steps if stop_at_step is None else min(stop_at_step, total_steps)

    logger = _Logger(output_dir, t.tensorboard, is_main)
    monitor = CollapseMonitor(num_prototypes=cfg.head.dino_out_dim, patience=3,
                              warmup_steps=int(cfg.loss.warmup_teacher_temp_epochs * epoch_length),
                              student_temp=cfg.loss.student_temp)
    if t.precision == "auto" and is_main:
        print(describe_precision(t.precision, device, cfg))
    autocast = make_autocast(device, resolve_precision(t.precision, device, cfg))

    # Early warnings: kNN (from its value at initialisation) or the features' effective rank falling.
    knn_watch = BelowStartWarning("the teacher's kNN top-1 (%)")
    rank_watch = BelowStartWarning("the effective rank of the student's [CLS] features", fraction=0.5)
    if start_step > 0:
        knn_watch.start = _first_logged(output_dir, "knn_top1")  # None: this resumed run takes its first as reference

    def evaluate_knn(step):
        if knn_data is not None and is_main:
            top1 = knn_accuracy(arch.teacher.backbone, knn_data, k=t.knn_k)
            logger.log({"step": step, "knn_top1": top1})
            message = knn_watch.update(top1, step)
            if message:
                warnings.warn(message, stacklevel=3)
            return top1

    if start_step == 0 and t.knn_every and start_step < end_step:
        evaluate_knn(0)  # the network at initialisation, as a baseline

    loader = torch.utils.data.DataLoader(
        batches, batch_size=None, shuffle=False, num_workers=t.num_workers,
        pin_memory=device.type == "cuda", persistent_workers=False, worker_init_fn=_one_thread_worker,
    )
    bar = None
    if progress and is_main:
        from tqdm import tqdm  # a text bar: tqdm.auto draws a widget, an empty box in the built book
        bar = tqdm(total=end_step, initial=start_step, desc="training", dynamic_ncols=True)

    step, tic = start_step, time.perf_counter()
    if start_step < end_step:
        for batch in loader:
            step = batch["step"]
            batch = move_batch(batch, device)
            values = schedule_values(cfg, step, total_steps, epoch_length, global_batch)
            out = train_step(arch, optimizer, batch, step, values, seed=t.seed,
                             clip_grad=cfg.optim.clip_grad, rank=rank, autocast=autocast)
            done = step + 1
            if done % t.log_every == 0 or done == end_step:
                elapsed, tic = time.perf_counter() - tic, time.perf_counter()
                terms = ("loss", "dino", "ibot", "koleo", "gram", "grad_norm")
                record = {"step": done, **{k: out[k].item() for k in terms if k in out},
                          "lr": values.lr, "weight_decay": values.weight_decay, "momentum": values.momentum,
                          "teacher_temp": values.teacher_temp}
                if arch.gram_teacher is not None:
                    record.update(gram_weight=values.gram_weight, local_dino_weight=values.local_dino_weight)
                record["images_per_s"] = t.batch_size * world_size * (done - getattr(logger, "_last", start_step)) / elapsed
                logger._last = done
                logger.log(record)
                if not math.isfinite(record["loss"]):
                    raise FloatingPointError(f"loss is {record['loss']} at step {done}: lower optim.base_lr, "
                                             "check the data, or use train.precision=fp32")
                if bar:
                    bar.set_postfix(loss=f"{record['loss']:.3f}", dino=f"{record['dino']:.3f}",
                                    ibot=f"{record['ibot']:.3f}", koleo=f"{record['koleo']:.3f}",
                                    img_s=f"{record['images_per_s']:.0f}")
            if t.monitor_every and (done % t.monitor_every == 0 or done == end_step):
                message = monitor.update(loss=out["dino"].item(), teacher_probs=out["teacher_probs"],
                                         student_logits=out["student_logits"], features=out["student_cls"],
                                         step=done)
                metrics = {k: v for k, v in monitor.history[-1].items() if k not in ("step", "loss")}
                logger.log({"step": done, **{f"monitor/{k}": v for k, v in metrics.items()}})
                for message in (message, rank_watch.update(metrics["effective_rank"], done)):
                    if message and is_main:
                        warnings.warn(message, stacklevel=3)
            if t.knn_every and done % t.knn_every == 0 and done != end_step:
                evaluate_knn(done)
            if output_dir and is_main and (done % t.checkpoint_every == 0 or done == end_step):
                save_checkpoint(training_state(arch, optimizer, done, cfg), output_dir, done, t.keep_last)
            if bar:
                bar.update(1)
            if done >= end_step:
                break
        step = end_step
    if bar:
        bar.close()

    finished = step >= total_steps
    if finished and start_step < total_steps:
        evaluate_knn(total_steps)
    if finished and output_dir and is_main:
        from dinolite.hub import export_official
        torch.save(export_official(arch.teacher.backbone), os.path.join(output_dir, "teacher_backbone_official.pth"))
    logger.close()
    arch.history = logger.history
    arch.total_steps, arch.completed_steps = total_steps, step
    return arch
