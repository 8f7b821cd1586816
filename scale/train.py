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
import contextlib
import json
import math
import os
import sys
import time
import warnings

if __package__ in (None, ""):  # run as a file (torchrun scale/train.py): make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from dinolite.ema import ema_update_, make_teacher
from dinolite.gram_teacher import GramTeacher
from dinolite.train.checkpoint import CheckpointError
from dinolite.train.config import Config, config_diff
from dinolite.train.data import _MODEL, StepBatches, derive_seed, move_batch
from dinolite.train.loop import RESUMABLE_KEYS, OutputDirError, make_autocast
from dinolite.train.meta_arch import DINOv2MetaArch, build_backbone, build_student, build_student_on_meta_and_init
from dinolite.train.optim import apply_schedule_, build_optimizer, schedule_values
from dinolite.train.precision import describe_precision, resolve_precision
from scale import checkpoint as ckpt
from scale.config import RESUMABLE_DIST_KEYS, DistConfig, load_scale_config, save_scale_config

_DTYPE = {"bf16": torch.bfloat16, "fp32": torch.float32}
# The backbone returns views (the CLS row of the tokens); the meta-architecture only reads them out of place
# (indexing, cat, float()), so FSDP2's pre-backward hook is kept: tests/test_scale_train.py checks the gradients.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPVisionTransformer\) returned a view tensor")


def _local(tensor):
    """A DTensor's shard on this rank, or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradient norm was not finite for dist.max_nonfinite steps in a row."""


# ---------------------------------------------------------------------------------------
# process group


def init_distributed(device_name: str = "auto") -> torch.device:
    """Join the torchrun process group (NCCL on CUDA, gloo on CPU), or make a group of one process."""
    use_cuda = torch.cuda.is_available() if device_name == "auto" else device_name.startswith("cuda")
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        if "RANK" in os.environ:
            dist.init_process_group(backend, device_id=device if use_cuda else None)
        else:  # python scale/train.py: one process
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return device


# ---------------------------------------------------------------------------------------
# sharding


_SAVED_IN_SELECTIVE = {
    torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _keep_matmuls_and_attention(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_IN_SELECTIVE else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(block: torch.nn.Module, mode: str) -> None:
    """Recompute the block's activations in backward: all of them ("full") or all but the outputs of matmuls
    and attention ("selective"). Wraps block.forward in place, so parameter names do not change."""
    if mode == "none":
        return
    forward = block.forward
    if mode == "full":
        def checkpointed(*args, **kwargs):
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    elif mode == "selective":
        def context():
            return create_selective_checkpoint_contexts(_keep_matmuls_and_attention)

        def checkpointed(*args, **kwargs):
            return checkpoint(forward, *args, use_reentrant=False, context_fn=context, **kwargs)
    else:
        raise ValueError(f"activation checkpointing must be 'none', 'full' or 'selective', got {mode!r}")
    block.forward = checkpointed


def shard_backbone(backbone, mesh, mp_policy, reshard_after_forward: bool, ac: str = "none",
                   compile_blocks: bool = False) -> None:
    """Per block: activation checkpointing, then torch.compile, then fully_shard; then the backbone root."""
    for block in backbone.blocks:
        apply_activation_checkpointing(block, ac)
        if compile_blocks:
            block.compile()
        fully_shard(block, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    fully_shard(backbone, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    # The meta-architecture calls these methods rather than forward: FSDP2 must gather the root's weights for them.
    register_fsdp_forward_method(backbone, "forward_features")
    register_fsdp_forward_method(backbone, "forward_features_list")


def shard_student_or_teacher(model, mesh, mp_policy, dcfg: DistConfig, trained: bool) -> None:
    """backbone (blocks, root) and each head as its own FSDP2 unit. Teachers (trained=False) skip activation
    checkpointing (no backward) and always free their weights after forward."""
    shard_backbone(model.backbone, mesh, mp_policy, dcfg.reshard_after_forward if trained else True,
                   dcfg.activation_checkpointing if trained else "none", dcfg.compile)
    for head in {id(model.dino_head): model.dino_head, id(model.ibot_head): model.ibot_head}.values():
        fully_shard(head, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=True)


def _fill_nan_(module: torch.nn.Module) -> None:
    """DINOv3's guard: after to_empty every float is NaN, so a tensor the init misses shows up."""
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
            if local.is_floating_point():
                local.fill_(float("nan"))


def _check_finite(module: torch.nn.Module, what: str) -> None:
    bad = [name for name, tensor in list(module.named_parameters()) + list(module.named_buffers())
           if tensor.is_floating_point() and not torch.isfinite(
               tensor.to_local() if isinstance(tensor, DTensor) else tensor).all()]
    flag = torch.tensor(len(bad), dtype=torch.float32)
    dist.all_reduce(flag)
    if flag.item():
        raise RuntimeError(f"{what}: not initialised on some rank (NaN after materialising): {bad[:5]}")


@torch.no_grad()
def _broadcast_full_state(module, full_state: dict | None) -> None:
    """Collective: copy rank 0's unsharded state dict into every rank's shards (and plain buffers), one tensor at a
    time (at most one full tensor in memory per rank)."""
    rank = dist.get_rank()
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        local = _local(tensor)
        if rank == 0:
            if name not in full_state or full_state[name].shape != tensor.shape:
                raise RuntimeError(f"the initial state has no tensor {name!r} of shape {tuple(tensor.shape)}")
            full = full_state[name].to(device=local.device, dtype=local.dtype)
        else:
            full = torch.empty(tensor.shape, dtype=local.dtype, device=local.device)
        dist.broadcast(full, src=0)
        if isinstance(tensor, DTensor):  # keep this rank's part; no communication (src_data_rank=None)
            full = distribute_tensor(full, tensor.device_mesh, tensor.placements, src_data_rank=None).to_local()
        local.copy_(full)


@torch.no_grad()
def _copy_shards_(target, source) -> None:
    """target <- source, parameter by parameter and buffer by buffer (local shards; the same sharding)."""
    for (name, t), (_, s) in zip(list(target.named_parameters()) + list(target.named_buffers()),
                                 list(source.named_parameters()) + list(source.named_buffers()), strict=True):
        (t.to_local() if isinstance(t, DTensor) else t).copy_(s.to_local() if isinstance(s, DTensor) else s)


def precision_on_every_rank(cfg: Config, device: torch.device) -> str:
    """train.precision with "auto" resolved ("bf16" or "fp32"), the same on every rank: rank 0 decides
    (dinolite.train.precision.resolve_precision; on a CPU that may time a probe, which could differ between
    processes) and broadcasts its choice."""
    if cfg.train.precision != "auto":
        return cfg.train.precision
    choice = [resolve_precision("auto", device, cfg) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(choice, src=0)
    return choice[0]


def build_sharded_arch(cfg: Config, dcfg: DistConfig, device: torch.device) -> DINOv2MetaArch:
    """The DINOv2MetaArch with FSDP2-sharded student, EMA teacher and (gram.weight > 0) Gram teacher.

    Initial weights do not depend on the number of processes: rank 0 runs dinolite's explicit init with
    torch.manual_seed(train.seed) on one unsharded copy (on CPU, as build_student_on_meta_and_init does for
    one process) and broadcasts it into the shards; the teacher then copies the student shard by shard.
    """
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    param_dtype = dcfg.param_dtype if dcfg.param_dtype != "auto" else precision_on_every_rank(cfg, device)
    param_dtype = None if param_dtype == "fp32" else _DTYPE[param_dtype]
    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=_DTYPE[dcfg.reduce_dtype])
    with torch.device("meta"):
        student = build_student(cfg)
    teacher = make_teacher(student)
    shard_student_or_teacher(student, mesh, mp_policy, dcfg, trained=True)
    shard_student_or_teacher(teacher, mesh, mp_policy, dcfg, trained=False)
    for model in (student, teacher):
        model.to_empty(device=device)
        _fill_nan_(model)

    full = None
    if dist.get_rank() == 0:
        torch.manual_seed(cfg.train.seed)
        full = build_student_on_meta_and_init(cfg, "cpu").state_dict()
    _broadcast_full_state(student, full)
    del full
    _copy_shards_(teacher, student)
    _check_finite(student, "student")
    _check_finite(teacher, "teacher")

    gram_teacher = None
    if cfg.gram.weight > 0:
        gram_teacher = build_sharded_gram_teacher(cfg, mesh, mp_policy, dcfg, device)
    group = None if dcfg.koleo_group_size == 0 else dcfg.koleo_group_size
    return DINOv2MetaArch(cfg, device=device, student=student, teacher=teacher, gram_teacher=gram_teacher,
                          koleo_group_size=group)


def build_sharded_gram_teacher(cfg: Config, mesh, mp_policy, dcfg: DistConfig, device) -> GramTeacher:
    """The Gram teacher sharded like the backbones (inference only, freed after forward); rank 0 loads gram.teacher
    (a dinolite checkpoint or an official-layout file, e.g. written by scale/export.py) and broadcasts it."""
    g = cfg.gram
    if not g.teacher:
        raise CheckpointError("gram.weight > 0 needs a Gram teacher: set gram.teacher to an official-layout .pth "
                         "(python -m scale.export RUN_DIR --step STEP writes one) or a dinolite checkpoint")
    with torch.device("meta"):
        gram = GramTeacher(build_backbone(cfg), g.update_every, g.first_update, g.max_updates)
    shard_backbone(gram.backbone, mesh, mp_policy, reshard_after_forward=True, compile_blocks=dcfg.compile)
    register_fsdp_forward_method(gram.backbone, "forward_features")
    gram.to_empty(device=device)
    _fill_nan_(gram)
    full = None
    if dist.get_rank() == 0:
        loaded = GramTeacher(build_student_on_meta_and_init(cfg, "cpu").backbone)
        full = loaded.load(g.teacher, None if g.teacher_step < 0 else g.teacher_step).state_dict()
    _broadcast_full_state(gram, full)
    with torch.no_grad():
        gram.n_updates.zero_()
    _check_finite(gram, "Gram teacher")
    return gram


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
    local = [_local(g) for g in grads]
    device = local[0].device if local else torch.device("cpu")
    squares = (torch.stack([n.float() ** 2 for n in torch._foreach_norm(local)]).sum() if local
               else torch.zeros((), device=device))
    dist.all_reduce(squares)
    total = squares.sqrt()
    if max_norm > 0:
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(local, coef.to(local[0].dtype) if local else coef)
    return total


def _reshard(*models) -> None:
    """Free gathered weights of FSDP2 roots that keep them after an inference forward."""
    for model in models:
        if model is None:
            continue
        for module in model.modules():
            if hasattr(module, "reshard") and hasattr(module, "unshard"):
                module.reshard()


LOGGED = ("loss", "dino", "ibot", "koleo", "gram")


def train_step(arch: DINOv2MetaArch, optimizer, batch: dict, step: int, values, seed: int, clip_grad: float,
               autocast=contextlib.nullcontext) -> dict:
    """dinolite.train.loop.train_step on shards: the same order (seed, schedule, Gram refresh, losses, backward,
    clip, AdamW, EMA), with the global-norm clip, losses averaged over ranks for the log, and no update at all
    when the loss or the gradient norm is not finite (returns finite=False)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(derive_seed(seed, step, rank, _MODEL))
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
    return record


# ---------------------------------------------------------------------------------------
# the loop


def _check_resume_config(output_dir: str, cfg: Config, dcfg: DistConfig) -> None:
    """Before building anything: the run in output_dir must have the same config (but run-control keys)."""
    saved_path = os.path.join(output_dir, "config.yaml")
    if os.path.exists(saved_path):
        saved_cfg, saved_dist = load_scale_config(saved_path)
        allowed = RESUMABLE_KEYS | {"train.batch_size"}  # checked below through the global batch
        diff = {k: v for k, v in config_diff(saved_cfg, cfg).items() if k not in allowed}
        for name, value in vars(dcfg).items():
            if getattr(saved_dist, name) != value and f"dist.{name}" not in RESUMABLE_DIST_KEYS:
                diff[f"dist.{name}"] = (getattr(saved_dist, name), value)
        if diff:
            lines = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise OutputDirError(f"{output_dir} holds a run with a different config ({lines}). Resume with the "
                                 "same config, or use a new --output-dir")


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


def _truncate_metrics(path: str, last_step: int) -> None:
    """Keep only the records up to the checkpoint resumed from (a killed run may have logged steps after it)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
    with open(path, "w") as f:
        f.writelines(kept)


def train(cfg: Config, dcfg: DistConfig, data, output_dir: str | None = None, stop_at_step: int | None = None,
          progress: bool | None = None, log=print) -> DINOv2MetaArch:
    """Train on every rank of the initialised process group (init_distributed) and return the sharded arch.

    Args mirror dinolite.train.train: data is a --data spec or a dataset; output_dir holds config.yaml,
    metrics.jsonl, dcp_<step>/ checkpoints and, at the end, teacher_backbone_official.pth; a directory with
    checkpoints is resumed. stop_at_step simulates an interruption (a checkpoint is written there).
    The returned arch has `history` (the logged records, every rank) and `completed_steps`, `total_steps`.
    """
    from dinolite.data import build_dataset

    t = cfg.train
    rank, world_size = dist.get_rank(), dist.get_world_size()
    is_main = rank == 0
    device = torch.device("cuda", torch.cuda.current_device()) if (
        t.device != "cpu" and torch.cuda.is_available() and dist.get_backend() == "nccl") else torch.device("cpu")
    progress = t.progress if progress is None else progress
    dataset = build_dataset(data) if isinstance(data, str) else data
    global_batch = t.batch_size * world_size
    epoch_length = t.epoch_length or max(1, len(dataset) // global_batch)
    total_steps = t.epochs * epoch_length
    StepBatches(dataset, cfg, total_steps, 0, rank, world_size)  # checks the data size before building anything

    if output_dir:
        if os.path.exists(output_dir) and not os.path.isdir(output_dir):
            raise OutputDirError(f"output directory {output_dir} is a file; give the path of a directory")
        try:
            os.makedirs(output_dir, exist_ok=True)
        except OSError as e:
            raise OutputDirError(f"cannot create output directory {output_dir} ({e.strerror}); "
                                 "give a path you can write to") from None
    path = ckpt.latest_checkpoint(output_dir) if output_dir else None
    if path:
        _check_resume_config(output_dir, cfg, dcfg)
    arch = build_sharded_arch(cfg, dcfg, device)
    optimizer = build_optimizer(arch.student, cfg)

    start_step = 0
    if output_dir and is_main:
        for stale in ckpt.remove_stale_temp_dirs(output_dir):
            log(f"removed {stale}: the temporary directory of a checkpoint save that never finished")
    if path:
        saved = ckpt.load_checkpoint(arch, optimizer, path)
        _check_global_batch(output_dir, cfg, world_size, saved)
        start_step = saved["step"]
        if is_main:
            log(f"resuming from step {start_step} (checkpoint {path}, saved by {saved['world_size']} processes)")
    if output_dir and is_main:
        save_scale_config(cfg, dcfg, os.path.join(output_dir, "config.yaml"))
        _truncate_metrics(os.path.join(output_dir, "metrics.jsonl"), start_step)
    dist.barrier()
    end_step = total_steps if stop_at_step is None else min(stop_at_step, total_steps)

    batches = StepBatches(dataset, cfg, total_steps, start_step, rank, world_size)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False, num_workers=t.num_workers,
                                         pin_memory=device.type == "cuda")
    precision = precision_on_every_rank(cfg, device)
    if t.precision == "auto" and is_main:
        log(describe_precision(t.precision, device, cfg))
    autocast = make_autocast(device, precision)
    history, nonfinite = [], 0
    bar = None
    if progress and is_main:
        from tqdm import tqdm
        bar = tqdm(total=end_step, initial=start_step, desc="training", dynamic_ncols=True)
    step, tic, last_logged = start_step, time.perf_counter(), start_step
    if start_step < end_step:
        for batch in loader:
            step = batch["step"]
            batch = move_batch(batch, device)
            values = schedule_values(cfg, step, total_steps, epoch_length, global_batch)
            record = train_step(arch, optimizer, batch, step, values, t.seed, cfg.optim.clip_grad, autocast)
            done = step + 1
            nonfinite = 0 if record.pop("finite") else nonfinite + 1
            record = {"step": done, **record, "lr": values.lr, "momentum": values.momentum}
            if done % t.log_every == 0 or done == end_step or nonfinite:
                elapsed, tic = time.perf_counter() - tic, time.perf_counter()
                record["images_per_s"] = global_batch * (done - last_logged) / elapsed
                last_logged = done
                history.append(record)
                if output_dir and is_main:
                    with open(os.path.join(output_dir, "metrics.jsonl"), "a") as f:
                        f.write(json.dumps(record) + "\n")
                if bar:
                    bar.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{record['images_per_s']:.0f}")
            if nonfinite >= dcfg.max_nonfinite:
                raise NonFiniteLossError(
                    f"loss or gradient not finite for {nonfinite} steps in a row (last: step {done}, loss "
                    f"{record['loss']}, grad norm {record['grad_norm']}); those steps were skipped. Lower "
                    "optim.base_lr, check the data, or use train.precision=fp32 dist.param_dtype=fp32; resume "
                    "from the last checkpoint")
            if output_dir and (done % t.checkpoint_every == 0 or done == end_step):
                ckpt.save_checkpoint(arch, optimizer, done, output_dir,
                                     {"global_batch": global_batch, "world_size": world_size},
                                     t.keep_last, dcfg.keep_every)
            if bar:
                bar.update(1)
            if done >= end_step:
                break
        step = end_step
    if bar:
        bar.close()
    if step >= total_steps and output_dir:
        from scale.export import export_teacher
        export_teacher(arch, os.path.join(output_dir, "teacher_backbone_official.pth"))
    arch.history, arch.total_steps, arch.completed_steps = history, total_steps, step
    arch._optimizer = optimizer  # for tests and callers that inspect the AdamW state
    return arch


# ---------------------------------------------------------------------------------------
# command line


def build_parser():
    import argparse

    from dinolite.data import DATA_SPEC_FORMS
    from dinolite.train.config import RECIPES
    from scale.config import dist_keys

    parser = argparse.ArgumentParser(
        prog="torchrun --nproc_per_node N scale/train.py",
        description="Distributed DINOv2 training (FSDP2) of the dinolite meta-architecture.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="data specs:\n  " + "\n  ".join(DATA_SPEC_FORMS) + "\n\ndist keys (key=value):\n  "
        + " ".join(dist_keys()) + "\nand every key of python -m dinolite.train --help",
    )
    parser.add_argument("--config", required=True, help=f"a recipe ({', '.join(RECIPES)}) or a YAML file")
    parser.add_argument("--data", required=True, help="dataset spec, e.g. textures, builtin:n=2000,size=64")
    parser.add_argument("--output-dir", required=True, help="checkpoints, logs, config.yaml; resumed if it exists")
    parser.add_argument("--stop-at-step", type=int, default=None, help="stop (with a checkpoint) after this step")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.batch_size=16 dist.compile=true")
    return parser


def main(argv=None) -> int:
    from dinolite.data import DataError

    args = build_parser().parse_args(argv)
    try:
        cfg, dcfg = load_scale_config(args.config, args.overrides)
    except ValueError as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank gets here: say it once
            print(f"error: {e}", file=sys.stderr)
        return 2
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
