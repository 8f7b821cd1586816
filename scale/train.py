"""Distributed DINOv2 / DINOv3 pre-training: the dinolite meta-architecture sharded with FSDP2.

    torchrun --nproc_per_node 2 scale/train.py --config tiny-cpu --data textures --output-dir runs/scale-tiny
    torchrun --nproc_per_node 8 scale/train.py --config vitg14-lvd142m --data folder:/data/imagenet/train --output-dir runs/g14 \\
        dist.activation_checkpointing=full

The same recipes, keys, losses, schedules and data pipeline as `python -m dinolite.train`, plus dist.* keys
(scale/config.py). What changes is only how the weights live on the processes:

    per block: activation checkpointing -> torch.compile (optional) -> fully_shard
    then: backbone root, each head (student, EMA teacher, Gram teacher: same plan; teachers inference only)
    build on meta -> to_empty -> NaN everywhere -> rank 0 runs the explicit init and broadcasts it into the shards
    step: losses (SK / centre / KoLeo statistics over the global batch) -> backward (FSDP2 reduce-scatters the
          gradient mean) -> clip each module by its global norm -> AdamW on the shards -> EMA on the shards (local)

NCCL on CUDA, gloo on CPU. Without torchrun it runs as one process. Checkpoints: scale/checkpoint.py (DCP).
"""
import argparse
import contextlib
import math
import os
import signal
import sys
import warnings

if __package__ in (None, ""):  # run as a file (torchrun scale/train.py): make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist
import yaml
from torch.distributed.tensor import DTensor

from dinolite import distributed
from dinolite.checkpoint import CheckpointError, DiskFullError
from dinolite.data import DATA_SPEC_FORMS, DataError
from dinolite.ema import ema_update_
from dinolite.eval import knn_classify
from dinolite.monitor import CollapseMonitor
from dinolite.train.config import Config, config_diff
from dinolite.train.data import StepBatches, move_batch, seed_step
from dinolite.train.meta_arch import DINOv2MetaArch
from dinolite.train.optim import apply_schedule_, build_optimizer, schedule_values, student_modules, total_grad_norm
from dinolite.train.precision import describe_precision
from dinolite.train.recipes import RECIPES
from dinolite.train.faults import (
    NonFiniteLossError,
    NonFiniteSteps,
    PREEMPTED_EXIT_CODE,
    Preemption,
    checkpoint_bytes,
    warn_low_disk,
)
from dinolite.train.run import (
    Cadence,
    MetricsLog,
    OutputDirError,
    RESUMABLE_KEYS,
    RunDir,
    Steps,
    Throughput,
    UnusableGPUError,
    make_autocast,
    make_loader,
    run_length,
    training_data,
)
from scale import checkpoint as ckpt
from scale.config import (
    RESUMABLE_DIST_KEYS,
    DistConfig,
    dist_keys,
    load_scale_config,
    save_scale_config,
    scale_config_to_dict,
)
from scale.export import export_teacher
from scale.parallelize import build_sharded_arch, init_distributed, local_shard, precision_on_every_rank

# The backbone returns views (the CLS row of the tokens); the meta-architecture only reads them out of place
# (indexing, cat, float()), so FSDP2's pre-backward hook is kept: tests/test_scale_train.py checks the gradients.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPVisionTransformer\) returned a view tensor")


# ---------------------------------------------------------------------------------------
# the step


@torch.no_grad()
def clip_grad_norm_per_module_(modules: dict, max_norm: float) -> dict[str, torch.Tensor]:
    """dinolite.train.optim.clip_grad_norm_per_module_ on FSDP2 shards: each module is clipped by the GLOBAL L2
    norm of its own gradient; returns {name: that norm before clipping} (the same on every rank).

    Each rank sums the squares of its gradient shards per module; ONE all-reduce adds the ranks' sums of all
    modules: each module's norm as torch.nn.utils.clip_grad_norm_ computes it in one process.
    """
    shards = {}
    for name, module in modules.items():
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        if any(not isinstance(g, DTensor) for g in grads):
            raise TypeError("clip_grad_norm_per_module_ expects FSDP2-sharded parameters (DTensor gradients)")
        shards[name] = [local_shard(g) for g in grads]
    device = next((s[0].device for s in shards.values() if s),
                  distributed.collective_device() or torch.device("cpu"))
    squares = torch.stack([torch.stack([n.float() ** 2 for n in torch._foreach_norm(local)]).sum().to(device)
                           if local else torch.zeros((), device=device) for local in shards.values()])
    distributed.all_reduce_(squares)
    norms = squares.sqrt()
    if max_norm > 0:
        coefs = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for local, coef in zip(shards.values(), coefs):
            if local:
                torch._foreach_mul_(local, coef.to(local[0].dtype))
    return dict(zip(shards, norms))


@torch.no_grad()  # not inference_mode (dinolite.eval.extract_features): FSDP2's unshard needs version counters
def sharded_knn_accuracy(backbone, knn_data, k: int, batch_size: int = 256) -> float:
    """dinolite.eval.knn_accuracy for a sharded backbone: every rank embeds the same images (each sharded forward
    gathers the weights from all ranks), so every rank gets the same top-1 (%)."""
    features = []
    was_training = backbone.training
    backbone.eval()
    for dataset in knn_data:
        rows, labels = [], []
        device = next(backbone.parameters()).device
        for first in range(0, len(dataset), batch_size):  # in this process: no DataLoader workers to configure
            items = [dataset[i] for i in range(first, min(first + batch_size, len(dataset)))]
            images = torch.stack([image for image, _ in items]).to(device)
            rows.append(backbone.forward_features(images)["x_norm_clstoken"].float().cpu())
            labels.append(torch.as_tensor([label for _, label in items]))
        features.append((torch.cat(rows), torch.cat(labels).long()))
    backbone.train(was_training)
    _reshard(backbone)
    (memory, memory_labels), (queries, query_labels) = features
    return knn_classify(memory, memory_labels, queries, query_labels, k=k)["top1"]


def _reshard(*models) -> None:
    """Free gathered weights of FSDP2 roots that keep them after an inference forward."""
    for model in models:
        if model is None:
            continue
        for module in model.modules():
            if hasattr(module, "reshard") and hasattr(module, "unshard"):
                module.reshard()


LOGGED = ("loss", "dino", "ibot", "koleo", "gram")
MODULE_NORMS = ("backbone_grad_norm", "dino_head_grad_norm", "ibot_head_grad_norm")  # official names
MONITORED = ("teacher_probs", "student_logits", "student_cls")
# Keys of the dinolite config that scale/train.py does not act on: a value other than the default is an error.
UNHONOURED = ("teacher.checkpoint", "teacher.config", "teacher.students", "train.minutes")


def train_step(arch: DINOv2MetaArch, optimizer, batch: dict, step: int, values, seed: int, clip_grad: float,
               autocast=contextlib.nullcontext) -> dict:
    """dinolite.train.loop.train_step on shards: the same order (seed, schedule, Gram refresh, losses, backward,
    clip, AdamW, EMA), with each module clipped by its global norm, losses averaged over ranks for the log, and no
    update at all when the loss or the gradient norm is not finite (returns finite=False)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    seed_step(seed, step, rank)
    arch.train()
    apply_schedule_(optimizer, values)
    optimizer.zero_grad(set_to_none=True)
    if arch.gram_teacher is not None:
        arch.gram_teacher.maybe_refresh(step, arch.teacher.backbone)
    out = arch.forward_losses(batch, values.teacher_temp, autocast, values.gram_weight, values.local_dino_weight)
    _reshard(arch.teacher, arch.gram_teacher)
    out["loss"].backward()
    norms = clip_grad_norm_per_module_(student_modules(arch.student), clip_grad)
    grad_norm = total_grad_norm(norms)
    # Every rank logs the mean over ranks (the loss of the global batch) and decides the same way.
    terms = [k for k in LOGGED if k in out]
    logged = torch.stack([out[k].detach().float() for k in terms]).to(grad_norm.device)
    distributed.all_reduce_(logged)
    record = {k: v / world for k, v in zip(terms, logged.tolist())}
    record["grad_norm"] = grad_norm.item()
    record.update({f"{name}_grad_norm": norm.item() for name, norm in norms.items()})
    record["finite"] = math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])
    if record["finite"]:
        optimizer.step()
        ema_update_(arch.teacher, arch.student, values.momentum)
    record["monitor"] = {k: out[k].detach() for k in MONITORED if k in out}  # this rank's, for the collapse monitor
    return record


# ---------------------------------------------------------------------------------------
# the loop


def _check_global_batch(output_dir: str, cfg: Config, world_size: int, progress: dict) -> None:
    """The data position is the step: it means the same images only with the same global batch."""
    global_batch = cfg.train.batch_size * world_size
    if progress["global_batch"] != global_batch:
        saved = progress["global_batch"]
        hint = (f"train.batch_size={saved // world_size}" if saved % world_size == 0
                else f"a number of processes that divides {saved}")
        raise OutputDirError(f"{output_dir} was trained with a global batch of {saved} images, this run has "
                             f"{global_batch} (train.batch_size={cfg.train.batch_size} x {world_size} processes); "
                             f"resume with {hint} so the run continues on the same data and schedules")


def _start_stage(arch, optimizer, continue_from, init_from, total_steps: int, log) -> int:
    """The start of a stage from another scale/ run (see train); returns the step to start at."""
    if continue_from and init_from:
        raise CheckpointError("give either --continue-from (weights, optimiser and step) or --init-from (weights only)")
    source = continue_from or init_from
    path = ckpt.resolve_run_checkpoint(source)
    if path is None:
        raise CheckpointError(f"{source} is not a scale/ run directory with dcp_<step> checkpoints")
    start_step = ckpt.load_stage_start(arch, optimizer, path, weights_only=bool(init_from))
    if start_step >= total_steps:
        raise CheckpointError(f"{path} is at step {start_step} but this config ends at step {total_steps}: raise "
                              "train.epochs to train further")
    if log:
        log(f"starting at step {start_step} from {path} ({'weights only' if init_from else 'weights, AdamW, step'})")
    return start_step


def train(cfg: Config, dcfg: DistConfig, data, output_dir: str | None = None, stop_at_step: int | None = None,
          progress: bool | None = None, log=print, continue_from: str | None = None,
          init_from: str | None = None, stop_signals: tuple = (signal.SIGTERM,)) -> DINOv2MetaArch:
    """Train on every rank of the initialised process group (init_distributed) and return the sharded arch.

    Args mirror dinolite.train.train: data is a --data spec or a dataset; output_dir holds config.yaml,
    metrics.jsonl, dcp_<step>/ checkpoints and, at the end, teacher_backbone_official.pth; a directory with
    checkpoints is resumed. stop_at_step simulates an interruption (a checkpoint is written there).
    continue_from / init_from ("RUN[@STEP]" of a scale/ run, any process count), when output_dir holds no checkpoint:
    start this (new) config from that run's weights, AdamW state and step, or from its teacher's weights only at
    step 0 with a fresh AdamW (scale.checkpoint.load_stage_start), e.g. the DINOv3 Gram and high-resolution stages.
    stop_signals: the signals that end the run at a step boundary with a checkpoint (faults.Preemption).
    The returned arch has `history` (the logged records, every rank) and `completed_steps`, `total_steps`.
    """
    t = cfg.train
    rank, world_size = dist.get_rank(), dist.get_world_size()
    is_main = rank == 0
    device = torch.device("cuda", torch.cuda.current_device()) if (
        t.device != "cpu" and torch.cuda.is_available() and "nccl" in str(dist.get_backend())) else torch.device("cpu")
    progress = t.progress if progress is None else progress
    dataset, knn_data = training_data(data, cfg, log=log if is_main else (lambda line: None), index_dir=output_dir)
    global_batch = t.batch_size * world_size
    epoch_length, total_steps = run_length(cfg, dataset, world_size)
    StepBatches(dataset, cfg, total_steps, 0, rank, world_size)  # checks the data size before building anything

    # Before building anything: the run in output_dir must have the same config (but run-control keys;
    # the batch size is checked below through the global batch).
    run_dir = RunDir(output_dir, is_main, log, latest=ckpt.latest_checkpoint, remove_stale=ckpt.remove_stale_temp_dirs)
    path = run_dir.latest_checkpoint()
    if path:
        run_dir.check_config(cfg, load=load_scale_config, allowed=RESUMABLE_KEYS | {"train.batch_size"},
                             extra_diff=lambda saved: {
                                 f"dist.{name}": (getattr(saved[1], name), value) for name, value in vars(dcfg).items()
                                 if getattr(saved[1], name) != value and f"dist.{name}" not in RESUMABLE_DIST_KEYS})
    arch = build_sharded_arch(cfg, dcfg, device)
    optimizer = build_optimizer(arch.student, cfg)
    start_step = 0
    if path:
        saved = ckpt.load_checkpoint(arch, optimizer, path)
        _check_global_batch(output_dir, cfg, world_size, saved)
        start_step = saved["step"]
        if is_main:
            log(f"resuming from step {start_step} (checkpoint {path}, saved by {saved['world_size']} processes)")
    resumed_step = start_step
    if (continue_from or init_from) and not path:
        start_step = _start_stage(arch, optimizer, continue_from, init_from, total_steps, log if is_main else None)
    run_dir.start(resumed_step, lambda config_path: save_scale_config(cfg, dcfg, config_path), data=data)
    dist.barrier()
    end_step = total_steps if stop_at_step is None else min(stop_at_step, total_steps)

    batches = StepBatches(dataset, cfg, total_steps, start_step, rank, world_size)
    precision = precision_on_every_rank(cfg, device)
    if t.precision == "auto" and is_main:
        log(describe_precision(t.precision, device, cfg))
    autocast = make_autocast(device, precision)
    stop = Preemption(device, stop_signals)  # the ranks agree on the step (the signal all-reduced on `device`)
    metrics, cadence = MetricsLog(run_dir, t.tensorboard, t.wandb), Cadence(t, end_step, stop)
    nonfinite = NonFiniteSteps(t.max_nonfinite, output_dir, ckpt.latest_checkpoint)
    warn_low_disk(run_dir, checkpoint_bytes(arch.student, arch.teacher), t.keep_last)
    monitor = CollapseMonitor(num_prototypes=cfg.head.dino_out_dim, patience=3,
                              warmup_steps=int(cfg.loss.warmup_teacher_temp_epochs * epoch_length),
                              student_temp=cfg.loss.student_temp) if is_main else None

    def evaluate_knn(step):
        """Every rank runs the same kNN (each sharded forward needs all ranks); rank 0 logs it."""
        if knn_data is not None:
            top1 = sharded_knn_accuracy(arch.teacher.backbone, knn_data, k=t.knn_k)
            metrics.log({"step": step, "knn_top1": top1})

    if start_step == 0 and t.knn_every and start_step < end_step:
        evaluate_knn(0)  # the network at initialisation, as a baseline
    steps = Steps(make_loader(batches, t.num_workers, device), start_step, end_step, progress and is_main, stop=stop)
    throughput = Throughput(global_batch, start_step)
    for step, batch in steps:
        values = schedule_values(cfg, step, total_steps, epoch_length, global_batch)
        record = train_step(arch, optimizer, move_batch(batch, device), step, values, t.seed, cfg.optim.clip_grad,
                            autocast)
        done = step + 1
        finite = record.pop("finite")
        monitored = record.pop("monitor")
        record = {"step": done, **record, "lr": values.lr, "momentum": values.momentum}
        if cadence.log(done) or not finite:
            record["images_per_s"] = throughput(done)
            metrics.log(record)
            steps.show(loss=record["loss"], img_s=record["images_per_s"])
        nonfinite.update(finite, done, record["loss"], record["grad_norm"])
        if monitor is not None and cadence.monitor(done):
            warning = monitor.update(loss=record["dino"], teacher_probs=monitored["teacher_probs"],
                                     student_logits=monitored["student_logits"], features=monitored["student_cls"],
                                     step=done)
            metrics.log({"step": done, **{f"monitor/{k}": v for k, v in monitor.history[-1].items()
                                          if k not in ("step", "loss")}})
            if warning:
                warnings.warn(warning, stacklevel=2)
        if cadence.knn(done):
            evaluate_knn(done)
        if run_dir.path and cadence.checkpoint(done):
            ckpt.save_checkpoint(arch, optimizer, done, output_dir,
                                 {"global_batch": global_batch, "world_size": world_size},
                                 t.keep_last, dcfg.keep_every)
    if steps.completed >= total_steps and start_step < total_steps:
        evaluate_knn(total_steps)
    if steps.completed >= total_steps and run_dir.path:
        export_teacher(arch, run_dir.file("teacher_backbone_official.pth"))
    metrics.close()
    arch.history, arch.total_steps, arch.completed_steps = metrics.history, total_steps, steps.completed
    arch.stopped_by = stop.message(output_dir, run_dir.latest_checkpoint()) if stop.stopped_at else None
    arch._optimizer = optimizer  # for tests and callers that inspect the AdamW state
    return arch


# ---------------------------------------------------------------------------------------
# command line


def build_parser():

    parser = argparse.ArgumentParser(
        prog="torchrun --nproc_per_node N scale/train.py",
        description="Distributed DINOv2 training (FSDP2) of the dinolite meta-architecture.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="data specs:\n  " + "\n  ".join(DATA_SPEC_FORMS) + "\n\ndist keys (key=value):\n  "
        + " ".join(dist_keys()) + "\nand every key of python -m dinolite.train --help but "
        + ", ".join(UNHONOURED) + " (an error here)",
    )
    parser.add_argument("--config", required=True, help=f"a recipe ({', '.join(RECIPES)}) or a YAML file")
    parser.add_argument("--data", help="dataset spec, e.g. textures, builtin:n=2000,size=64 (required to train)")
    parser.add_argument("--output-dir", help="checkpoints, logs, config.yaml; resumed if it exists (required to train)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config (with dist:) and exit")
    parser.add_argument("--continue-from", metavar="RUN[@STEP]",
                        help="start a new stage from another scale/ run's weights, optimiser and step "
                             "(any process count)")
    parser.add_argument("--init-from", metavar="RUN[@STEP]",
                        help="start at step 0 from another scale/ run's teacher weights only (fresh optimiser)")
    parser.add_argument("--stop-at-step", type=int, default=None, help="stop (with a checkpoint) after this step")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.batch_size=16 dist.compile=true")
    return parser


def unhonoured_keys(cfg: Config) -> list[str]:
    """The keys in UNHONOURED that cfg sets to something other than their default."""
    changed = config_diff(Config(), cfg)
    return [f"{key}={changed[key][1]}" for key in UNHONOURED if key in changed]


def main(argv=None, stop_signals: tuple = (signal.SIGTERM,)) -> int:
    """The command line; stop_signals as in train (scale/launch_slurm.py adds submitit's time-limit signal)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.print_config and not (args.data and args.output_dir):
        parser.error("--data and --output-dir are required to train (only --config for --print-config)")
    try:
        cfg, dcfg = load_scale_config(args.config, args.overrides)
        ignored = unhonoured_keys(cfg)
        if ignored:
            raise ValueError(f"scale/train.py does not honour {', '.join(ignored)}: distillation (teacher.*) and "
                             "train.minutes run with python -m dinolite.train; remove them here")
    except ValueError as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank gets here: say it once
            print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        if os.environ.get("RANK", "0") == "0":
            print(yaml.safe_dump(scale_config_to_dict(cfg, dcfg), sort_keys=False))
        return 0
    try:
        device = init_distributed(cfg.train.device)
    except UnusableGPUError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        return 2
    is_main = dist.get_rank() == 0
    torch.set_num_threads(max(1, cfg.train.threads or torch.get_num_threads()))
    try:
        arch = train(cfg, dcfg, args.data, args.output_dir, stop_at_step=args.stop_at_step,
                     continue_from=args.continue_from, init_from=args.init_from, stop_signals=stop_signals)
    except (DataError, OutputDirError, CheckpointError) as e:
        if is_main:
            print(f"error: {e}", file=sys.stderr)
        dist.destroy_process_group()
        return 2
    except (NonFiniteLossError, DiskFullError) as e:
        if is_main:
            print(f"error: {e}", file=sys.stderr)
        dist.destroy_process_group()
        return 1
    if arch.stopped_by:
        if is_main:
            print(arch.stopped_by, file=sys.stderr)
        dist.destroy_process_group()
        return PREEMPTED_EXIT_CODE
    if is_main:
        world = dist.get_world_size()
        print(f"done: {arch.completed_steps}/{arch.total_steps} steps on {world} process{'es' * (world > 1)} ({device}), "
              f"outputs in {args.output_dir}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
