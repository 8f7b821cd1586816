"""The DINOv2 / DINOv3 training step (a plain function) and the training loop: an explicit for-loop over the run
engine's pieces (dinolite.train.run: output directory, resume, logs, cadence, checkpoints, export). train() is also
the mode switch: with teacher.checkpoint set it runs distillation (dinolite.train.distill).

    arch = train(get_config("tiny-cpu"), "builtin:n=2000,size=32", output_dir="runs/tiny")

Exact resume: every random number of step s (batch contents, augmentations, masks, drop path)
is derived from (seed, step, rank), every schedule is a function of s, and a checkpoint holds
student, teacher, optimiser and centering state. So a run stopped after step s and resumed
continues bitwise like an uninterrupted one (on CPU; CUDA kernels may be non-deterministic).
"""
import contextlib
import copy
import warnings

import torch

from dinolite import distributed
from dinolite.checkpoint import CheckpointError, atomic_save, load_checkpoint, resolve_checkpoint, save_checkpoint
from dinolite.ema import ema_update_
from dinolite.eval import knn_accuracy
from dinolite.hub import export_official
from dinolite.monitor import BelowStartWarning, CollapseMonitor, check_teacher
from dinolite.train.budget import PROBE_STEPS, BudgetError, fit_to_minutes
from dinolite.train.config import Config, config_diff, config_from_dict, config_to_dict
from dinolite.train.data import StepBatches, move_batch, seed_step
from dinolite.train.distill import train_distill
from dinolite.train.meta_arch import DINOv2MetaArch
from dinolite.train.optim import (StepValues, apply_schedule_, build_optimizer, clip_grad_norm_per_module_,
                                  schedule_values, student_modules, total_grad_norm)
from dinolite.train.precision import describe_precision, resolve_precision
from dinolite.train.faults import NonFiniteSteps, Preemption, checkpoint_bytes, finite, warn_low_disk
from dinolite.train.run import (
    Cadence,
    MetricsLog,
    OutputDirError,
    RESUMABLE_KEYS,
    RunDir,
    Steps,
    Throughput,
    intra_op_threads,
    make_autocast,
    make_loader,
    resolve_device,
    run_length,
    save_config_to,
    training_data,
)

# Below this many images per rank and step, batch statistics (Sinkhorn-Knopp columns, KoLeo
# nearest neighbours, the centre) get noisy; we warn.
SMALL_BATCH = 32


LOGGED = ("loss", "dino", "ibot", "koleo", "gram", "grad_norm",
          "backbone_grad_norm", "dino_head_grad_norm", "ibot_head_grad_norm")


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
    Returns the loss terms and monitor tensors of `arch.forward_losses`, plus each module's gradient norm before
    clipping (`<module>_grad_norm`, official names; each module is clipped on its own), their total `grad_norm`,
    and `finite` (False: the loss or the gradient norm is not finite, and the step was skipped: no AdamW or EMA
    update).
    """
    seed_step(seed, step, rank)
    arch.train()
    apply_schedule_(optimizer, values)
    optimizer.zero_grad(set_to_none=True)
    if arch.gram_teacher is not None:
        arch.gram_teacher.maybe_refresh(step, arch.teacher.backbone)  # before the step, as officially
    out = arch.forward_losses(batch, values.teacher_temp, autocast, values.gram_weight, values.local_dino_weight)
    out["loss"].backward()
    norms = clip_grad_norm_per_module_(student_modules(arch.student), clip_grad)
    out.update({f"{name}_grad_norm": norm for name, norm in norms.items()}, grad_norm=total_grad_norm(norms))
    out["finite"] = finite(out["loss"], out["grad_norm"])
    if out["finite"]:
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
    state (a smaller file: dinolite.checkpoint.weights_only_state) starts AdamW afresh. Returns the
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


def start_from_weights(state: dict, arch: DINOv2MetaArch, source: str) -> None:
    """A weights-only start (a new stage at step 0 with a fresh optimiser, e.g. DINOv3's high-resolution
    adaptation): the checkpoint's TEACHER weights go into the student and the teacher, as the official
    student.resume_from_teacher_chkpt does (dinov3/train/ssl_meta_arch.py:328-337); no optimiser state, no step."""
    try:
        arch.student.load_state_dict(state["teacher"], strict=True)
        arch.teacher.load_state_dict(state["teacher"], strict=True)
    except (KeyError, RuntimeError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{source} does not fit this config ({first_line}): start from a run with the same "
                              "model and head settings") from None


def probe_steps(arch: DINOv2MetaArch, optimizer, dataset, cfg: Config, device: torch.device):
    """run_steps(n) for budget.fit_to_minutes: the next n steps from the start (real loader, real step), after which
    run_steps.restore() puts the weights and optimiser back as they were, so the probe leaves no trace in the run."""
    t = cfg.train
    initial = copy.deepcopy((arch.state_dict(), optimizer.state_dict()))
    epoch_length, total_steps = run_length(cfg, dataset)
    batches = StepBatches(dataset, cfg, 1 + PROBE_STEPS, 0)
    loader = iter(make_loader(batches, t.num_workers, device))
    autocast = make_autocast(device, resolve_precision(t.precision, device, cfg))

    def run_steps(n):
        for _ in range(n):
            batch = next(loader)
            values = schedule_values(cfg, batch["step"], total_steps, epoch_length, t.batch_size)
            train_step(arch, optimizer, move_batch(batch, device), batch["step"], values, seed=t.seed,
                       clip_grad=cfg.optim.clip_grad, autocast=autocast)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def restore():
        arch.load_state_dict(initial[0])
        optimizer.load_state_dict(initial[1])

    run_steps.restore = restore
    return run_steps


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
          continue_from: str | None = None, init_from: str | None = None) -> DINOv2MetaArch:
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
        init_from: "RUN_DIR", "RUN_DIR@STEP" or a checkpoint file: a weights-only start (start_from_weights: its
            teacher's weights in student and teacher, a fresh optimiser, step 0), e.g. the high-resolution stage.
    The returned module has `history`: the list of logged records (also in metrics.jsonl).
    It runs with intra_op_threads(cfg.train.threads, cfg.train.num_workers) compute threads and
    restores the previous number afterwards.
    """
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(intra_op_threads(cfg.train.threads, cfg.train.num_workers))
    try:
        return _train(cfg, data, output_dir, stop_at_step, knn_data, device, progress, continue_from, init_from)
    finally:
        torch.set_num_threads(previous_threads)


def _train(cfg: Config, data, output_dir, stop_at_step, knn_data, device, progress,
           continue_from=None, init_from=None) -> DINOv2MetaArch:
    if continue_from and init_from:
        raise CheckpointError("give either continue_from (weights, optimiser and step) or init_from (weights only)")
    if cfg.teacher.checkpoint and init_from:
        raise CheckpointError("init_from starts DINOv2/v3 training; a distillation stage continues with continue_from")
    if cfg.teacher.checkpoint and cfg.train.minutes:
        raise BudgetError("train.minutes is not available for distillation (teacher.checkpoint) yet; "
                          "set the run length with train.epochs and train.epoch_length")
    if cfg.teacher.checkpoint:  # distillation from a frozen teacher (dinolite.train.distill)
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
    dataset, knn_data = training_data(data, cfg, knn_data, index_dir=output_dir)
    global_batch = t.batch_size * world_size
    epoch_length, total_steps = run_length(cfg, dataset, world_size)
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

    # Output directory: resume from its newest checkpoint, or continue from another run's.
    run_dir = RunDir(output_dir, is_main)
    if t.minutes > 0:  # fix the step count from the measured step time (dinolite.train.budget)
        probe = probe_steps(arch, optimizer, dataset, cfg, device)
        epoch_length, note = fit_to_minutes(cfg, run_dir, probe)
        probe.restore()
        total_steps = t.epochs * epoch_length
        if is_main:
            print(note)
    start_step = 0
    path = run_dir.latest_checkpoint()
    if path:
        run_dir.check_config(cfg)
        state = load_checkpoint(path, map_location=device)
        bad = {k: v for k, v in config_diff(config_from_dict(state["config"]), cfg).items()
               if k not in RESUMABLE_KEYS}
        if bad:
            raise OutputDirError(f"checkpoint {path} was trained with another config: {bad}. Resume with "
                                 "that config, or use a new --output-dir")
        start_step = restore_training_state(state, arch, optimizer)
        if is_main:
            print(f"resuming from step {start_step} (checkpoint {path})")
    resumed_step = start_step
    if continue_from and start_step == 0:
        source = resolve_checkpoint(continue_from)
        start_step = continue_training_state(load_checkpoint(source, map_location=device), arch, optimizer, source)
        if start_step >= total_steps:
            raise CheckpointError(f"{source} is at step {start_step} but this config ends at step {total_steps}: "
                                  "raise train.epochs to train further")
        if is_main:
            print(f"continuing from step {start_step} of {source} with the new config")
    if init_from and start_step == 0:
        source = resolve_checkpoint(init_from)
        start_from_weights(load_checkpoint(source, map_location=device), arch, source)
        if is_main:
            print(f"starting at step 0 from the weights of {source} (fresh optimiser)")
    batches = StepBatches(dataset, cfg, total_steps, start_step, rank, world_size)  # checks the data size
    run_dir.start(resumed_step, save_config_to(cfg), data=data)
    end_step = total_steps if stop_at_step is None else min(stop_at_step, total_steps)

    log = MetricsLog(run_dir, t.tensorboard, t.wandb)
    stop = Preemption(device)
    cadence = Cadence(t, end_step, stop)
    nonfinite = NonFiniteSteps(t.max_nonfinite, run_dir.path)
    warn_low_disk(run_dir, checkpoint_bytes(arch.student, arch.teacher), t.keep_last)
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
        knn_watch.start = run_dir.first_logged("knn_top1")  # None: this resumed run takes its first as reference

    def evaluate_knn(step):
        if knn_data is not None and is_main:
            top1 = knn_accuracy(arch.teacher.backbone, knn_data, k=t.knn_k)
            log.log({"step": step, "knn_top1": top1})
            message = knn_watch.update(top1, step)
            if message:
                warnings.warn(message, stacklevel=3)

    if start_step == 0 and t.knn_every and start_step < end_step:
        evaluate_knn(0)  # the network at initialisation, as a baseline

    steps = Steps(make_loader(batches, t.num_workers, device), start_step, end_step, progress and is_main, stop=stop)
    throughput = Throughput(global_batch, start_step)
    for step, batch in steps:
        values = schedule_values(cfg, step, total_steps, epoch_length, global_batch)
        out = train_step(arch, optimizer, move_batch(batch, device), step, values, seed=t.seed,
                         clip_grad=cfg.optim.clip_grad, rank=rank, autocast=autocast)
        done = step + 1
        if cadence.log(done) or not out["finite"]:
            record = {"step": done, **{k: out[k].item() for k in LOGGED if k in out},
                      "lr": values.lr, "weight_decay": values.weight_decay, "momentum": values.momentum,
                      "teacher_temp": values.teacher_temp}
            if arch.gram_teacher is not None:
                record.update(gram_weight=values.gram_weight, local_dino_weight=values.local_dino_weight)
            record["images_per_s"] = throughput(done)
            log.log(record)
            steps.show(loss=record["loss"], dino=record["dino"], ibot=record["ibot"], koleo=record["koleo"],
                       img_s=record["images_per_s"])
        nonfinite.update(out["finite"], done, out["loss"].item(), out["grad_norm"].item())
        if cadence.monitor(done):
            message = monitor.update(loss=out["dino"].item(), teacher_probs=out["teacher_probs"],
                                     student_logits=out["student_logits"], features=out["student_cls"], step=done)
            metrics = {k: v for k, v in monitor.history[-1].items() if k not in ("step", "loss")}
            log.log({"step": done, **{f"monitor/{k}": v for k, v in metrics.items()}})
            for message in (message, rank_watch.update(metrics["effective_rank"], done)):
                if message and is_main:
                    warnings.warn(message, stacklevel=3)
        if cadence.knn(done):
            evaluate_knn(done)
        if run_dir.path and is_main and cadence.checkpoint(done):
            save_checkpoint(training_state(arch, optimizer, done, cfg), output_dir, done, t.keep_last)

    finished = steps.completed >= total_steps
    if finished and start_step < total_steps:
        evaluate_knn(total_steps)
    if finished and run_dir.path and is_main:
        atomic_save(export_official(arch.teacher.backbone), run_dir.file("teacher_backbone_official.pth"))
    log.close()
    arch.history = log.history
    arch.total_steps, arch.completed_steps = total_steps, steps.completed
    arch.stopped_by = stop.message(output_dir, run_dir.latest_checkpoint()) if stop.stopped_at else None
    return arch
