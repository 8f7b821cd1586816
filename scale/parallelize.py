"""How the dinolite meta-architecture lives on many processes: the process group, FSDP2 sharding, activation
checkpointing (the one selective-ops list, also read by scale/plan.py), torch.compile, and the sharded init.

    per block: activation checkpointing -> torch.compile (optional) -> fully_shard
    then: backbone root, each head (student, EMA teacher, Gram teacher: same plan; teachers inference only)
    build on meta -> to_empty -> NaN everywhere -> rank 0 runs the explicit init and broadcasts it into the shards
"""
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from dinolite import distributed
from dinolite.checkpoint import CheckpointError
from dinolite.ema import make_teacher
from dinolite.gram_teacher import GramTeacher
from dinolite.train.config import Config
from dinolite.train.meta_arch import DINOv2MetaArch, build_backbone, build_student, build_student_on_meta_and_init
from dinolite.train.precision import resolve_precision
from dinolite.train.run import resolve_device
from scale import checkpoint as ckpt
from scale.config import DistConfig

_DTYPE = {"bf16": torch.bfloat16, "fp32": torch.float32}


def local_shard(tensor):
    """A DTensor's shard on this rank, or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


# ---------------------------------------------------------------------------------------
# process group


def local_cuda_device(local_rank: int, device_count: int) -> torch.device:
    """This process's GPU: cuda:(LOCAL_RANK mod visible GPUs). torchrun shows every GPU of the node to every
    process (LOCAL_RANK picks one); SLURM with one GPU per task shows each process only its own (cuda:0)."""
    if device_count < 1:
        raise RuntimeError("train.device=cuda but no GPU is visible (CUDA_VISIBLE_DEVICES?); use train.device=cpu")
    return torch.device("cuda", local_rank % device_count)


def init_distributed(device_name: str = "auto") -> torch.device:
    """Join the torchrun process group, or make a group of one process. On CUDA the group has NCCL for GPU
    tensors and gloo for CPU tensors ("cpu:gloo,cuda:nccl"); on CPU, gloo. Collectives are then checked
    against the returned device (dinolite.distributed.set_collective_device)."""
    use_cuda = resolve_device(device_name).type == "cuda"
    if use_cuda:
        device = local_cuda_device(int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if use_cuda else "gloo"
        if "RANK" in os.environ:
            dist.init_process_group(backend, device_id=device if use_cuda else None)
        else:  # python scale/train.py: one process
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    distributed.set_collective_device(device)
    return device


# ---------------------------------------------------------------------------------------
# sharding


# The ops whose outputs DINOv3's selective checkpointing keeps (by ATen op name; everything else is recomputed).
# The one list: the trainer's policy below and scale/plan.py's memory model both read it.
SELECTIVE_SAVE_OPS = frozenset({
    "mm", "addmm", "bmm", "baddbmm", "linear", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention"})


def keep_matmuls_and_attention(ctx, op, *args, **kwargs):
    """The selective policy: save the outputs of SELECTIVE_SAVE_OPS, recompute the rest."""
    name = op.overloadpacket.__name__ if hasattr(op, "overloadpacket") else str(op)
    return CheckpointPolicy.MUST_SAVE if name in SELECTIVE_SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


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
            return create_selective_checkpoint_contexts(keep_matmuls_and_attention)

        def checkpointed(*args, **kwargs):
            return checkpoint(forward, *args, use_reentrant=False, context_fn=context, **kwargs)
    else:
        raise ValueError(f"activation checkpointing must be 'none', 'full' or 'selective', got {mode!r}")
    block.forward = checkpointed


def shard_backbone(backbone, mesh, mp_policy, reshard_after_forward: bool, ac: str = "none",
                   compile_blocks: bool = False, prefetch: bool = True) -> None:
    """Per block: activation checkpointing, then torch.compile, then fully_shard; then the backbone root.

    prefetch: the official explicit chain (dinov3/fsdp/ac_compile_parallelize.py:118-121): each block prefetches
    the next one's weights in forward and the previous one's in backward (overlap; the results are the same)."""
    for block in backbone.blocks:
        apply_activation_checkpointing(block, ac)
        if compile_blocks:
            block.compile()
        fully_shard(block, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    if prefetch:
        for before, after in zip(backbone.blocks, backbone.blocks[1:]):
            before.set_modules_to_forward_prefetch([after])
            after.set_modules_to_backward_prefetch([before])
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
    tensors = list(module.parameters()) + list(module.buffers())
    device = local_shard(tensors[0]).device if tensors else distributed.collective_device()
    flag = torch.tensor(float(len(bad)), device=device)  # on the training device: NCCL reduces no CPU tensor
    distributed.all_reduce_(flag)
    if flag.item():
        raise RuntimeError(f"{what}: not initialised on some rank (NaN after materialising): {bad[:5]}")


@torch.no_grad()
def _broadcast_full_state(module, full_state: dict | None) -> None:
    """Collective: copy rank 0's unsharded state dict into every rank's shards (and plain buffers), one tensor at a
    time (at most one full tensor in memory per rank)."""
    rank = dist.get_rank()
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        local = local_shard(tensor)
        if rank == 0:
            if name not in full_state or full_state[name].shape != tensor.shape:
                raise RuntimeError(f"the initial state has no tensor {name!r} of shape {tuple(tensor.shape)}")
            full = full_state[name].to(device=local.device, dtype=local.dtype)
        else:
            full = torch.empty(tensor.shape, dtype=local.dtype, device=local.device)
        distributed.broadcast_(full, src=0)
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


def koleo_group_ranks(dcfg: DistConfig, batch_size: int, world_size: int) -> int | None:
    """The ranks per KoLeo group (None: all ranks): dist.koleo_group_samples / train.batch_size when set (the
    official unit, samples; the global batch must split into whole groups, as koleo_loss.py:89-96 asserts), else
    dist.koleo_group_size (ranks; 0: all)."""
    if dcfg.koleo_group_samples:
        ranks = dcfg.koleo_group_samples // batch_size
        if world_size % ranks:
            raise ValueError(f"dist.koleo_group_samples={dcfg.koleo_group_samples} ({ranks} ranks of {batch_size}) "
                             f"does not divide the global batch of {world_size} ranks: use a multiple of ranks")
        return None if ranks == world_size else ranks
    return None if dcfg.koleo_group_size == 0 else dcfg.koleo_group_size


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
    group = koleo_group_ranks(dcfg, cfg.train.batch_size, dist.get_world_size())
    return DINOv2MetaArch(cfg, device=device, student=student, teacher=teacher, gram_teacher=gram_teacher,
                          koleo_group_size=group)


def build_sharded_gram_teacher(cfg: Config, mesh, mp_policy, dcfg: DistConfig, device) -> GramTeacher:
    """The Gram teacher sharded like the backbones (inference only, freed after forward): from a scale/ run directory
    (gram.teacher=RUN, gram.teacher_step) every rank reads its shards; else rank 0 loads gram.teacher (a dinolite
    checkpoint or an official-layout file, e.g. written by scale/export.py) and broadcasts it."""
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
    scale_run = ckpt.resolve_run_checkpoint(g.teacher, None if g.teacher_step < 0 else g.teacher_step)
    if scale_run:  # a scale/ run (DCP): every rank reads its rows of the EMA teacher's backbone
        ckpt.load_teacher_backbone(gram.backbone, scale_run)
    else:
        full = None
        if dist.get_rank() == 0:
            loaded = GramTeacher(build_student_on_meta_and_init(cfg, "cpu").backbone)
            full = loaded.load(g.teacher, None if g.teacher_step < 0 else g.teacher_step).state_dict()
        _broadcast_full_state(gram, full)
    with torch.no_grad():
        gram.n_updates.zero_()
    _check_finite(gram, "Gram teacher")
    return gram
