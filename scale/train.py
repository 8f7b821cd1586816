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
          gradient mean) -> clip by the global norm -> AdamW on the shards -> EMA on the shards (no communication)

NCCL on CUDA, gloo on CPU. Without torchrun it runs as one process. Checkpoints: scale/checkpoint.py (DCP).
"""
import argparse
import contextlib
import math
import os
import sys
import warnings

if __package__ in (None, ""):  # run as a file (torchrun scale/train.py): make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist
import yaml
from torch.distributed.tensor import DTensor

from dinolite.checkpoint import CheckpointError
from dinolite.data import DATA_SPEC_FORMS, DataError
from dinolite.ema import ema_update_
from dinolite.eval import knn_classify
from dinolite.monitor import CollapseMonitor
from dinolite.train.config import Config, config_diff
from dinolite.train.data import StepBatches, move_batch, seed_step
from dinolite.train.meta_arch import DINOv2MetaArch
from dinolite.train.optim import apply_schedule_, build_optimizer, schedule_values
from dinolite.train.precision import describe_precision
from dinolite.train.recipes import RECIPES
from dinolite.train.run import (
    RESUMABLE_KEYS,
    Cadence,
    MetricsLog,
    OutputDirError,
    RunDir,
    Steps,
    Throughput,
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


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradient norm was not finite for dist.max_nonfinite steps in a row."""


# ---------------------------------------------------------------------------------------
# the step


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """Clip the gradients of sharded parameters by their GLOBAL L2 norm; returns that norm (same on every rank).

    Each rank sums the squares of its gradient shards, one all-reduce adds the ranks' sums: the norm of the
    whole gradient, as torch.nn.utils.clip_grad_norm_ computes it in one process.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if any(not isinstance(g, DTensor) for g in grads):
        raise TypeError("clip_grad_norm_ expects FSDP2-sharded parameters (DTensor gradients)")
    local = [local_shard(g) for g in grads]
    device = local[0].device if local else torch.device("cpu")
    squares = (torch.stack([n.float() ** 2 for n in torch._foreach_norm(local)]).sum() if local
               else torch.zeros((), device=device))
    dist.all_reduce(squares)
    total = squares.sqrt()
    if max_norm > 0:
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(local, coef.to(local[0].dtype) if local else coef)
    return total


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
MONITORED = ("teacher_probs", "student_logits", "student_cls")
# Keys of the dinolite config that scale/train.py does not act on: a value other than the default is an error.
UNHONOURED = ("teacher.checkpoint", "teacher.config", "teacher.students", "train.minutes")


def train_step(arch: DINOv2MetaArch, optimizer, batch: dict, step: int, values, seed: int, clip_grad: float,
               autocast=contextlib.nullcontext) -> dict:
    """dinolite.train.loop.train_step on shards: the same order (seed, schedule, Gram refresh, losses, backward,
    clip, AdamW, EMA), with the global-norm clip, losses averaged over ranks for the log, and no update at all
    when the loss or the gradient norm is not finite (returns finite=False)."""
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
    params = [p for p in arch.student.parameters() if p.grad is not None]
    grad_norm = clip_grad_norm_(params, clip_grad)
    # Every rank logs the mean over ranks (the loss of the global batch) and decides the same way.
    terms = [k for k in LOGGED if k in out]
    logged = torch.stack([out[k].detach().float() for k in terms]).to(grad_norm.device)
    dist.all_reduce(logged)
    record = {k: v / world for k, v in zip(terms, logged.tolist())}
    record["grad_norm"] = grad_norm.item()
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


def train(cfg: Config, dcfg: DistConfig, data, output_dir: str | None = None, stop_at_step: int | None = None,
          progress: bool | None = None, log=print) -> DINOv2MetaArch:
    """Train on every rank of the initialised process group (init_distributed) and return the sharded arch.

    Args mirror dinolite.train.train: data is a --data spec or a dataset; output_dir holds config.yaml,
    metrics.jsonl, dcp_<step>/ checkpoints and, at the end, teacher_backbone_official.pth; a directory with
    checkpoints is resumed. stop_at_step simulates an interruption (a checkpoint is written there).
    The returned arch has `history` (the logged records, every rank) and `completed_steps`, `total_steps`.
    """
    t = cfg.train
    rank, world_size = dist.get_rank(), dist.get_world_size()
    is_main = rank == 0
    device = torch.device("cuda", torch.cuda.current_device()) if (
        t.device != "cpu" and torch.cuda.is_available() and dist.get_backend() == "nccl") else torch.device("cpu")
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
    run_dir.start(start_step, lambda config_path: save_scale_config(cfg, dcfg, config_path), data=data)
    dist.barrier()
    end_step = total_steps if stop_at_step is None else min(stop_at_step, total_steps)

    batches = StepBatches(dataset, cfg, total_steps, start_step, rank, world_size)
    precision = precision_on_every_rank(cfg, device)
    if t.precision == "auto" and is_main:
        log(describe_precision(t.precision, device, cfg))
    autocast = make_autocast(device, precision)
    metrics, cadence, nonfinite = MetricsLog(run_dir, t.tensorboard, t.wandb), Cadence(t, end_step), 0
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
    steps = Steps(make_loader(batches, t.num_workers, device), start_step, end_step, progress and is_main)
    throughput = Throughput(global_batch, start_step)
    for step, batch in steps:
        values = schedule_values(cfg, step, total_steps, epoch_length, global_batch)
        record = train_step(arch, optimizer, move_batch(batch, device), step, values, t.seed, cfg.optim.clip_grad,
                            autocast)
        done = step + 1
        nonfinite = 0 if record.pop("finite") else nonfinite + 1
        monitored = record.pop("monitor")
        record = {"step": done, **record, "lr": values.lr, "momentum": values.momentum}
        if cadence.log(done) or nonfinite:
            record["images_per_s"] = throughput(done)
            metrics.log(record)
            steps.show(loss=record["loss"], img_s=record["images_per_s"])
        if nonfinite >= dcfg.max_nonfinite:
            raise NonFiniteLossError(
                f"loss or gradient not finite for {nonfinite} steps in a row (last: step {done}, loss "
                f"{record['loss']}, grad norm {record['grad_norm']}); those steps were skipped. Lower "
                "optim.base_lr, check the data, or use train.precision=fp32 dist.param_dtype=fp32; resume "
                "from the last checkpoint")
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
    parser.add_argument("--stop-at-step", type=int, default=None, help="stop (with a checkpoint) after this step")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.batch_size=16 dist.compile=true")
    return parser


def unhonoured_keys(cfg: Config) -> list[str]:
    """The keys in UNHONOURED that cfg sets to something other than their default."""
    changed = config_diff(Config(), cfg)
    return [f"{key}={changed[key][1]}" for key in UNHONOURED if key in changed]


def main(argv=None) -> int:
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
    device = init_distributed(cfg.train.device)
    is_main = dist.get_rank() == 0
    torch.set_num_threads(max(1, cfg.train.threads or torch.get_num_threads()))
    try:
        arch = train(cfg, dcfg, args.data, args.output_dir, stop_at_step=args.stop_at_step)
    except (DataError, OutputDirError, CheckpointError) as e:
        if is_main:
            print(f"error: {e}", file=sys.stderr)
        dist.destroy_process_group()
        return 2
    except NonFiniteLossError as e:
        if is_main:
            print(f"error: {e}", file=sys.stderr)
        dist.destroy_process_group()
        return 1
    if is_main:
        world = dist.get_world_size()
        print(f"done: {arch.completed_steps}/{arch.total_steps} steps on {world} process{'es' * (world > 1)} ({device}), "
              f"outputs in {args.output_dir}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
