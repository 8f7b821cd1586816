"""Memory planner: will a dinolite config train on N GPUs of a given type, and how fast?

    python -m scale.plan --config dinov3-vit7b16-pretrain --gpus 256 --gpu h100 --batch-per-gpu 16 \
        --activation-checkpointing full [--mfu 0.4] [--json] [key=value ...]

Per GPU, in bytes, for FSDP2 (fully_shard per transformer block, then the backbone root and each head
as their own unit, all on one mesh of `gpus` ranks):

    params      fp32 student shards          sum_p ceil(p.shape[0] / N) * prod(p.shape[1:]) * 4
    grads       fp32 gradient shards         the same (reduce_dtype fp32)
    optimizer   AdamW exp_avg + exp_avg_sq   2 x the same
    teachers    the EMA teacher (backbone + heads) and, with gram.weight > 0, the Gram teacher
                (backbone): fp32 shards, sharded on the same mesh, no gradients
    working     bf16 unsharded copies of the unit being computed and of the one prefetched, plus the
                unit's bf16 gradients and their fp32 reduce-scatter buffer (MixedPrecisionPolicy
                param_dtype bf16, reduce_dtype fp32)
    activations what the student's forward over all crops, its heads and losses save for backward, with
                activation checkpointing applied per block (see below), plus the teacher's targets

Parameter shapes come from the real modules (`dinolite.train.meta_arch.build_student`, built on the meta
device): the sharded size is FSDP2's, dim-0 chunks padded to a multiple of N per parameter (every rank
holds a padded chunk; rank 0's is never short, so it is the worst rank).

Activations are traced, not guessed: one training forward (`DINOv2MetaArch.forward_losses`, with the
teacher, the heads and the losses, at the requested batch, crops and masks) runs on fake tensors
(no memory, no compute) in bf16, and every tensor autograd saves for backward is counted once per storage.
Checkpointing is then applied per block: "full" keeps each block's input and recomputes one block at a
time in backward; "selective" also keeps the outputs of the matmuls and the attention (DINOv3's
selective policy) and recomputes the rest of one block at a time. The same trace counts the FLOPs of the
step (student forward + backward over all crops, teacher forward(s), heads), from which the step time
at a stated MFU (model FLOPs, recomputation not counted, over the GPU's dense bf16 peak) follows.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import sys
import unittest.mock
import warnings

import torch
from torch import nn

from dinolite.train.config import Config, apply_overrides, config_from_dict, config_to_dict
from scale.parallelize import SELECTIVE_SAVE_OPS  # the trainer's list: plan the policy it runs

MiB, GiB = 2 ** 20, 2 ** 30


@dataclasses.dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: int  # total device memory as nvidia-smi reports it
    peak_bf16_flops: float  # dense bf16 tensor-core peak, FLOP/s (vendor data sheets, SXM parts)


GPUS = {
    "a100-40gb": GPU("NVIDIA A100 40GB", 40960 * MiB, 312e12),
    "a100-80gb": GPU("NVIDIA A100 80GB", 81920 * MiB, 312e12),
    "h100": GPU("NVIDIA H100 80GB", 81559 * MiB, 989e12),
    "h200": GPU("NVIDIA H200 141GB", 143771 * MiB, 989e12),
}
AC_MODES = ("none", "full", "selective")
_DTYPES = ("bf16", "fp32")
# Reserved on every GPU, not available to tensors: the CUDA context, NCCL buffers and the caching
# allocator's fragmentation. A rule of thumb, stated in the output; --headroom changes it.
DEFAULT_HEADROOM = 0.10


# ----------------------------------------------------------------------------- FSDP2 shard sizes

def shard_numel(shape: tuple[int, ...], world_size: int) -> int:
    """Elements of one rank's FSDP2 shard storage of a parameter of `shape`: dim 0 is split into chunks of
    ceil(shape[0] / world_size) rows, and every rank holds a chunk of that size (the last ranks' chunks are
    padding when shape[0] is not a multiple of world_size)."""
    if not shape:
        return 1
    return math.ceil(shape[0] / world_size) * math.prod(shape[1:])


def local_numel(shape: tuple[int, ...], world_size: int, rank: int) -> int:
    """Elements of rank `rank`'s unpadded chunk (torch.chunk on dim 0): what a state created with
    zeros_like(sharded parameter), such as AdamW's exp_avg, holds on that rank."""
    if not shape:
        return 1
    rows = math.ceil(shape[0] / world_size)
    mine = max(0, min(rows, shape[0] - rank * rows))
    return mine * math.prod(shape[1:])


def fsdp_units(student: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The FSDP2 units of a dinolite student (ModuleDict backbone / dino_head / ibot_head): each block, the
    backbone's other parameters (patch embedding, tokens, norms), and each head. Shared heads count once."""
    units, seen = {}, set()
    backbone = student["backbone"]
    for i, block in enumerate(backbone.blocks):
        units[f"backbone.blocks.{i}"] = list(block.parameters())
        seen.update(id(p) for p in block.parameters())
    units["backbone"] = [p for p in backbone.parameters() if id(p) not in seen]
    seen.update(id(p) for p in units["backbone"])
    for name in ("dino_head", "ibot_head"):
        params = [p for p in student[name].parameters() if id(p) not in seen]
        if params:
            units[name] = params
            seen.update(id(p) for p in params)
    return units


def build_student_on_meta(cfg: Config) -> nn.ModuleDict:
    from dinolite.train.meta_arch import build_student

    with torch.device("meta"):
        return build_student(cfg)


def parameter_bytes(cfg: Config, world_size: int, rank: int = 0) -> dict:
    """Per-rank bytes of fp32 shards (padded storage) and of AdamW states (unpadded chunks) of the student,
    per part (backbone, dino_head, ibot_head), with parameter counts and the largest unit's size."""
    student = build_student_on_meta(cfg)
    units = fsdp_units(student)
    parts = {}
    for unit, params in units.items():
        part = unit.split(".")[0]
        row = parts.setdefault(part, dict(numel=0, shard_bytes=0, optimizer_bytes=0))
        for p in params:
            row["numel"] += p.numel()
            row["shard_bytes"] += 4 * shard_numel(tuple(p.shape), world_size)
            row["optimizer_bytes"] += 2 * 4 * local_numel(tuple(p.shape), world_size, rank)
    unit_sizes = {u: sum(world_size * shard_numel(tuple(p.shape), world_size) for p in ps) for u, ps in units.items()}
    return dict(parts=parts, units=unit_sizes)


# ----------------------------------------------------------------------------- the traced step

def _batch_shapes(cfg: Config, batch: int) -> dict:
    """Crops and iBOT masks of one step, as collate_multicrop draws them: int(2B * mask_probability) masked
    global crops with int(N * upper bin edge) patches each (its static upper bound)."""
    c, patch = cfg.crops, cfg.model.patch_size
    n_patches = (c.global_size // patch) ** 2
    n_masked_crops = int(2 * batch * c.mask_probability)
    edges = torch.linspace(c.mask_ratio_min, c.mask_ratio_max, n_masked_crops + 1, dtype=torch.float64).tolist()
    counts = torch.tensor([int(n_patches * edge) for edge in edges[1:]] + [0] * (2 * batch - n_masked_crops))
    masks = torch.arange(n_patches)[None, :] < counts[:, None]  # [2B, N]: crop i masks its first counts[i] patches
    return dict(masks=masks, n_patches=n_patches)


class _SavedTensorCounter:
    """Counts the bytes autograd saves for backward (once per storage; parameters excluded), by block."""

    def __init__(self, blocks: nn.ModuleList, exclude: set[int]):
        self.exclude = exclude
        self.seen: dict[int, tuple[int, int | None]] = {}  # storage id -> (bytes, block index)
        self.keep = []  # holds the storages so that their ids stay unique
        self.block: int | None = None
        self.block_inputs: dict[int, int] = {}
        self.produced_by_matmul: set[int] = set()
        self.handles = []
        for i, block in enumerate(blocks):
            self.handles.append(block.register_forward_pre_hook(self._enter(i)))
            self.handles.append(block.register_forward_hook(self._leave))

    def _enter(self, i):
        def hook(module, args):
            self.block = i
            if torch.is_grad_enabled():
                x = args[0]
                self.block_inputs[i] = x.untyped_storage().nbytes()
        return hook

    def _leave(self, module, args, output):
        self.block = None

    def pack(self, t: torch.Tensor):
        st = t.untyped_storage()
        key = st._cdata
        if key not in self.exclude and key not in self.seen:
            self.seen[key] = (st.nbytes(), self.block)
            self.keep.append(st)
        return t

    def by_block(self, depth: int) -> tuple[int, list[int], list[int]]:
        """(bytes saved outside blocks, bytes saved per block, of which produced by matmul/attention ops)."""
        outside, per_block, matmul = 0, [0] * depth, [0] * depth
        for key, (nbytes, block) in self.seen.items():
            if block is None:
                outside += nbytes
            else:
                per_block[block] += nbytes
                if key in self.produced_by_matmul:
                    matmul[block] += nbytes
        return outside, per_block, matmul

    def close(self):
        for h in self.handles:
            h.remove()


@functools.lru_cache(maxsize=256)
def _trace_cached(cfg_json: str, batch: int, dtype: torch.dtype, count_flops: bool) -> dict:
    return _trace(config_from_dict(json.loads(cfg_json)), batch, dtype, count_flops)


def trace_step(cfg: Config, batch: int, dtype: torch.dtype = torch.bfloat16, count_flops: bool = False) -> dict:
    """Run one training forward (and, with count_flops, its backward) of `cfg` at `batch` images on fake
    tensors (no memory, no compute). Returns the bytes autograd saves outside the blocks (outside_bytes),
    per block (block_bytes), of which outputs of matmuls and attention (block_matmul_bytes), each block's
    input (block_input_bytes) and, with count_flops, the FLOPs of the whole step (flops).

    Every block of a model sees the same shapes, so a model of 2 blocks is traced (and of 1, for the FLOPs)
    and the numbers of its second block are repeated `depth` times."""
    depth = cfg.model.depth
    short = [apply_overrides(cfg, [f"model.depth={d}"]) for d in (1, 2)]
    two = _trace_cached(json.dumps(config_to_dict(short[1])), batch, dtype, count_flops)
    result = dict(outside_bytes=two["outside_bytes"], block_bytes=[two["block_bytes"][1]] * depth,
                  block_matmul_bytes=[two["block_matmul_bytes"][1]] * depth,
                  block_input_bytes=[two["block_input_bytes"][1]] * depth)
    if count_flops:
        one = _trace_cached(json.dumps(config_to_dict(short[0])), batch, dtype, True)
        per_block = two["flops"] - one["flops"]
        result["flops"] = one["flops"] + (depth - 1) * per_block
        result["block_flops"] = per_block
    return result


def _trace(cfg: Config, batch: int, dtype: torch.dtype = torch.bfloat16, count_flops: bool = False) -> dict:
    """trace_step on the whole model."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    from dinolite.gram_teacher import GramTeacher
    from dinolite.train.meta_arch import DINOv2MetaArch

    shapes = _batch_shapes(cfg, batch)
    masks = shapes["masks"]
    mask_indices = masks.flatten().nonzero().flatten()
    masks_weight = (1.0 / masks.sum(-1).clamp(min=1).float())[mask_indices // shapes["n_patches"]]
    arch_cfg = apply_overrides(cfg, ["gram.weight=0"])
    c = cfg.crops

    class MatmulOutputs(TorchDispatchMode):
        def __init__(self, counter):
            super().__init__()
            self.counter = counter

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket.__name__ in SELECTIVE_SAVE_OPS:
                for t in (out if isinstance(out, (tuple, list)) else [out]):
                    if isinstance(t, torch.Tensor):
                        self.counter.produced_by_matmul.add(t.untyped_storage()._cdata)
                        self.counter.keep.append(t.untyped_storage())  # its id stays unique
            return out

    # Fake tensors carry no values: torch's trunc_normal_ loops until no value is out of range, which a fake
    # tensor cannot answer, so the (meaningless) initialisation is skipped; and the modules are built
    # directly as fake bf16 CPU tensors (FSDP2's param_dtype), so the constructor's .to(device) has nothing to do.
    no_init = unittest.mock.patch.object(nn.init, "trunc_normal_", lambda tensor, *args, **kwargs: tensor)
    no_move = unittest.mock.patch.object(nn.Module, "to", lambda module, *args, **kwargs: module)
    default_dtype = torch.get_default_dtype()
    with FakeTensorMode(allow_non_fake_inputs=True), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deepcopy of fake tensors asks for their (fake) data pointers
        try:
            torch.set_default_dtype(dtype)
            with no_init, no_move:
                arch = DINOv2MetaArch(arch_cfg)
                arch.pack_crops = True  # as on a GPU: the crop sizes share one pass over the blocks
                if cfg.gram.weight > 0:
                    arch.gram_teacher = GramTeacher(arch.student.backbone)
        finally:
            torch.set_default_dtype(default_dtype)
        arch.train()
        gsize, lsize = c.global_size, c.local_size
        step = dict(global_crops=torch.empty(2 * batch, 3, gsize, gsize, dtype=dtype),
                    local_crops=(torch.empty(c.n_local * batch, 3, lsize, lsize, dtype=dtype) if c.n_local else None),
                    masks=masks, mask_indices=mask_indices, masks_weight=masks_weight)
        if cfg.gram.weight > 0:
            big = int(cfg.gram.teacher_scale * gsize)
            step["gram_crops"] = torch.empty(2 * batch, 3, big, big, dtype=dtype)
        params = {p.untyped_storage()._cdata for p in arch.parameters()}
        params |= {b.untyped_storage()._cdata for b in arch.buffers()}
        blocks = arch.student.backbone.blocks
        counter = _SavedTensorCounter(blocks, params)
        flops = FlopCounterMode(display=False) if count_flops else contextlib.nullcontext()
        try:
            with flops:  # (entering a FlopCounterMode again would reset its counts)
                with MatmulOutputs(counter), torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
                    out = arch.forward_losses(step, teacher_temp=cfg.loss.teacher_temp,
                                              gram_weight=cfg.gram.weight, local_dino_weight=1.0)
                if count_flops:
                    out["loss"].backward()
        finally:
            counter.close()
        outside, per_block, matmul = counter.by_block(len(blocks))
    result = dict(outside_bytes=outside, block_bytes=per_block, block_matmul_bytes=matmul,
                  block_input_bytes=[counter.block_inputs[i] for i in range(len(blocks))])
    if count_flops:
        result["flops"] = flops.get_total_flops()
    return result


def activation_bytes(trace: dict, activation_checkpointing: str) -> int:
    """Bytes held by activations at the start of backward, with checkpointing applied per block."""
    outside, blocks = trace["outside_bytes"], trace["block_bytes"]
    inputs, matmul = trace["block_input_bytes"], trace["block_matmul_bytes"]
    if activation_checkpointing == "none":
        return outside + sum(blocks)
    if activation_checkpointing == "full":  # keep block inputs; one block recomputed at a time
        return outside + sum(inputs) + max(blocks)
    if activation_checkpointing == "selective":  # also keep matmul/attention outputs
        return outside + sum(i + m for i, m in zip(inputs, matmul)) + max(b - m for b, m in zip(blocks, matmul))
    raise ValueError(f"activation_checkpointing must be one of {', '.join(AC_MODES)}, got {activation_checkpointing!r}")


# ----------------------------------------------------------------------------- the plan

def _check_inputs(gpus, gpu, batch_per_gpu, activation_checkpointing, mfu, headroom):
    if gpu not in GPUS:
        raise ValueError(f"unknown GPU {gpu!r}; use one of {', '.join(GPUS)}")
    if not isinstance(gpus, int) or gpus < 1:
        raise ValueError(f"--gpus must be a positive integer, got {gpus!r}")
    if not isinstance(batch_per_gpu, int) or batch_per_gpu < 2:
        raise ValueError(f"--batch-per-gpu must be an integer >= 2 (KoLeo needs a neighbour), got {batch_per_gpu!r}")
    if activation_checkpointing not in AC_MODES:
        raise ValueError(f"--activation-checkpointing must be one of {', '.join(AC_MODES)}, "
                         f"got {activation_checkpointing!r}")
    if not 0 < mfu <= 1:
        raise ValueError(f"--mfu must be in (0, 1], e.g. 0.4, got {mfu}")
    if not 0 <= headroom < 1:
        raise ValueError(f"--headroom must be in [0, 1), e.g. 0.1, got {headroom}")


def plan(cfg: Config, gpus: int, gpu: str, batch_per_gpu: int, activation_checkpointing: str = "none",
         mfu: float = 0.4, headroom: float = DEFAULT_HEADROOM, search_max_batch: bool = True,
         param_dtype: str = "bf16") -> dict:
    """Per-GPU memory (bytes) and step time of training `cfg` with FSDP2 on `gpus` GPUs of type `gpu`.

    Returns a dict with params_bytes, grads_bytes, optimizer_bytes, teachers_bytes (and ema_teacher_bytes,
    gram_teacher_bytes), working_bytes, activations_bytes, total_bytes, gpu_bytes, usable_bytes, fits,
    max_batch_per_gpu (0: not even 2 images fit), step_flops, step_time_s and the parameter counts.
    param_dtype: FSDP2's compute dtype ("bf16", or "fp32" without mixed precision).
    """
    _check_inputs(gpus, gpu, batch_per_gpu, activation_checkpointing, mfu, headroom)
    if param_dtype not in _DTYPES:
        raise ValueError(f"param_dtype must be 'bf16' or 'fp32', got {param_dtype!r}")
    compute_bytes, dtype = (2, torch.bfloat16) if param_dtype == "bf16" else (4, torch.float32)
    device = GPUS[gpu]
    shards = parameter_bytes(cfg, gpus)
    parts = shards["parts"]
    params = sum(p["shard_bytes"] for p in parts.values())
    optimizer = sum(p["optimizer_bytes"] for p in parts.values())
    ema_teacher = params  # the same modules, sharded the same way, fp32
    gram_teacher = parts["backbone"]["shard_bytes"] if cfg.gram.weight > 0 else 0
    largest_unit = max(shards["units"].values())
    # current + prefetched unit in the compute dtype, the unit's gradients in it and the fp32 reduce-scatter input
    working = largest_unit * (3 * compute_bytes + 4)
    static = params + params + optimizer + ema_teacher + gram_teacher + working
    usable = int(device.memory_bytes * (1 - headroom))

    def activations(batch: int, count_flops: bool = False) -> tuple[int, dict]:
        trace = trace_step(cfg, batch, dtype, count_flops=count_flops)
        return activation_bytes(trace, activation_checkpointing), trace

    acts, trace = activations(batch_per_gpu, count_flops=True)
    total = static + acts
    result = dict(
        config_params=dict((k, v["numel"]) for k, v in parts.items()),
        gpus=gpus, gpu=gpu, gpu_name=device.name, batch_per_gpu=batch_per_gpu, global_batch=gpus * batch_per_gpu,
        activation_checkpointing=activation_checkpointing, param_dtype=param_dtype,
        params_bytes=params, grads_bytes=params, optimizer_bytes=optimizer,
        teachers_bytes=ema_teacher + gram_teacher, ema_teacher_bytes=ema_teacher, gram_teacher_bytes=gram_teacher,
        working_bytes=working, activations_bytes=acts, total_bytes=total,
        gpu_bytes=device.memory_bytes, usable_bytes=usable, headroom=headroom, fits=total <= usable,
        step_flops=trace["flops"], mfu=mfu, step_time_s=trace["flops"] / (device.peak_bf16_flops * mfu),
    )
    if search_max_batch:
        result["max_batch_per_gpu"] = _max_batch(lambda b: activations(b)[0], usable - static, batch_per_gpu)
    return result


def _max_batch(activations, budget: int, start: int) -> int:
    """Largest b >= 2 with activations(b) <= budget (0 if none). Activations grow about linearly with b: the
    line through b = start and 2 * start gives a guess, which exact traces then confirm or move."""
    def fits(b):
        return activations(b) <= budget

    if not fits(2):
        return 0
    a1, a2 = activations(start), activations(2 * start)
    slope = max((a2 - a1) / start, 1.0)
    guess = max(2, start + int((budget - a1) // slope))
    lo, hi, step = guess, guess + 1, max(1, guess // 64)
    while not fits(lo):  # walk down to a batch that fits ...
        hi, lo = lo, max(2, lo - step)
        step *= 2
    while fits(hi):  # ... and up to one that does not
        lo, hi = hi, hi + step
        step *= 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# ----------------------------------------------------------------------------- command line

ASSUMPTIONS = (
    "FSDP2 fully_shard per block, then the backbone root and each head, on one mesh of all GPUs (as scale/train.py); "
    "fp32 sharded parameters, gradients and AdamW states (exp_avg, exp_avg_sq); MixedPrecisionPolicy "
    "{param_dtype} compute / fp32 reduce; EMA teacher (and Gram teacher) sharded fp32; activations traced in {param_dtype} "
    "at the given batch, crops and masks (the input crops themselves, tens of MB, not counted); "
    "{headroom:.0%} of the GPU kept for CUDA context, NCCL and fragmentation; "
    "step time = traced FLOPs / (GPU dense bf16 peak x MFU), recomputation not counted."
)


def _gb(n: int) -> str:
    return f"{n / 1e9:8.2f} GB" if n >= 1e8 else f"{n / 1e6:8.2f} MB"


def format_plan(result: dict, config_name: str) -> str:
    r = result
    counts = ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in r["config_params"].items())
    lines = [
        f"{config_name} on {r['gpus']} x {r['gpu_name']}, {r['batch_per_gpu']} images per GPU "
        f"(global batch {r['global_batch']}), activation checkpointing: {r['activation_checkpointing']}",
        f"parameters: {counts}",
        "per GPU:",
        f"  parameters (fp32 shards)      {_gb(r['params_bytes'])}",
        f"  gradients (fp32 shards)       {_gb(r['grads_bytes'])}",
        f"  AdamW states (2 x fp32)       {_gb(r['optimizer_bytes'])}",
        f"  EMA teacher (fp32 shards)     {_gb(r['ema_teacher_bytes'])}",
    ]
    if r["gram_teacher_bytes"]:
        lines.append(f"  Gram teacher (fp32 shards)    {_gb(r['gram_teacher_bytes'])}")
    lines += [
        f"  working copies ({r['param_dtype']} units)   {_gb(r['working_bytes'])}",
        f"  activations                   {_gb(r['activations_bytes'])}",
        f"  total                         {_gb(r['total_bytes'])}",
        f"  GPU memory                    {_gb(r['gpu_bytes'])} ({_gb(r['usable_bytes']).strip()} usable)",
        f"fits: {'yes' if r['fits'] else 'NO'}; largest batch per GPU that fits: {r['max_batch_per_gpu']}",
        f"step: {r['step_flops'] / 1e15:.2f} PFLOP per GPU -> {r['step_time_s']:.2f} s at MFU {r['mfu']:.0%}",
        "assumed: " + ASSUMPTIONS.format(headroom=r["headroom"], param_dtype=r["param_dtype"]),
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m scale.plan",
                                     description="Per-GPU memory and step time of FSDP2 training of a dinolite config.")
    parser.add_argument("--config", required=True,
                        help="a dinolite recipe name or a YAML file (a scale/ run's config.yaml, with its dist: section)")
    parser.add_argument("--gpus", required=True, help="number of GPUs (FSDP2 shards over all of them)")
    parser.add_argument("--gpu", required=True, help=f"GPU type: {', '.join(GPUS)}")
    parser.add_argument("--batch-per-gpu", required=True, help="images per GPU per step")
    parser.add_argument("--activation-checkpointing", default=None,
                        help=f"{', '.join(AC_MODES)} (default: the config's dist.activation_checkpointing, else none)")
    parser.add_argument("--mfu", default="0.4", help="model FLOPs utilisation for the step time (default 0.4)")
    parser.add_argument("--headroom", default=str(DEFAULT_HEADROOM),
                        help="fraction of GPU memory kept free for the CUDA context, NCCL and fragmentation (default 0.1)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. model.depth=24 dist.param_dtype=fp32")
    return parser


def _parse_number(name: str, raw: str, kind):
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {raw!r}") from None


def main(argv=None) -> int:
    from scale.config import load_scale_config

    args = build_parser().parse_args(argv)
    try:
        gpus = _parse_number("--gpus", args.gpus, int)
        batch = _parse_number("--batch-per-gpu", args.batch_per_gpu, int)
        mfu = _parse_number("--mfu", args.mfu, float)
        headroom = _parse_number("--headroom", args.headroom, float)
        _check_inputs(gpus, args.gpu, batch, args.activation_checkpointing or "none", mfu, headroom)
        cfg, dcfg = load_scale_config(args.config, args.overrides)
        ac = args.activation_checkpointing or dcfg.activation_checkpointing
        # as scale/train.py; the planner is for GPUs, where train.precision=auto means bf16
        precision = "bf16" if cfg.train.precision == "auto" else cfg.train.precision
        param_dtype = precision if dcfg.param_dtype == "auto" else dcfg.param_dtype
        result = plan(cfg, gpus, args.gpu, batch, ac, mfu, headroom, param_dtype=param_dtype)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else format_plan(result, args.config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
