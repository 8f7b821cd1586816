"""Sharded training checkpoints with torch.distributed.checkpoint (DCP).

Each process writes its own shards of student, teacher and AdamW state into one directory,
run_dir/dcp_<step>/ (zero-padded step), with a .metadata file that lets any number of processes
read it back (saved by 2, loaded by 1 or 4: DCP reshards on load). A save goes to a temporary
directory (.tmp_dcp_<step>) that rank 0 renames once every rank has finished, so a crash leaves the
previous checkpoint or the new one, never half of one. Only the newest `keep_last` are kept, plus
every step that is a multiple of `keep_every`.

The data position is the step: batches are a pure function of (seed, step, rank) (dinolite.train.data),
so a resumed run reads the same images in the same order, also with another number of processes as
long as the global batch (train.batch_size x processes) is the same.
"""
import os
import re
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from dinolite.checkpoint import CheckpointError, DiskFullError, disk_full_message, is_disk_full, parse_run_at_step, path_bytes

# Plain numbers saved with the weights (the data position is the step; see the module docstring).
PROGRESS_KEYS = ("step", "global_batch", "world_size")
_NAME = re.compile(r"^dcp_(\d+)$")
_TEMP = re.compile(r"^\.tmp_dcp_\d+$")


def checkpoint_dir(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, f"dcp_{step:08d}")


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """[(step, path), ...] of complete checkpoints, sorted by step."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), os.path.join(output_dir, name))
             for name in os.listdir(output_dir) if (m := _NAME.match(name))]
    return sorted(found)


def latest_checkpoint(output_dir: str) -> str | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def remove_stale_temp_dirs(output_dir: str) -> list[str]:
    """Delete .tmp_dcp_* directories left by saves that never finished (call on rank 0 before training)."""
    if not os.path.isdir(output_dir):
        return []
    removed = []
    for name in sorted(os.listdir(output_dir)):
        if _TEMP.match(name):
            shutil.rmtree(os.path.join(output_dir, name))
            removed.append(os.path.join(output_dir, name))
    return removed


def _state(arch, optimizer=None) -> dict:
    """The DCP state dict of a (sharded) DINOv2MetaArch: DTensors for sharded weights, plain tensors for the rest."""
    state = {
        "student": get_model_state_dict(arch.student),
        "teacher": get_model_state_dict(arch.teacher),
        "centers": {name: getattr(arch, name).state_dict() for name in ("dino_center", "ibot_center")
                    if hasattr(arch, name)},
    }
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(arch.student, optimizer)
    if arch.gram_teacher is not None:
        state["gram_teacher"] = get_model_state_dict(arch.gram_teacher)
    return state


def save_checkpoint(arch, optimizer, step: int, output_dir: str, progress: dict, keep_last: int = 3,
                    keep_every: int = 0) -> str:
    """Collective: every rank calls it. Writes run_dir/dcp_<step>/ atomically; returns its path.

    progress: {"global_batch": ..., "world_size": ...} (PROGRESS_KEYS), saved with the weights and returned by
    load_checkpoint.
    """
    final = checkpoint_dir(output_dir, step)
    temp = os.path.join(output_dir, f".tmp_dcp_{step:08d}")
    rank = dist.get_rank()
    if rank == 0 and os.path.exists(temp):
        shutil.rmtree(temp)
    dist.barrier()
    progress = {key: int(dict(progress, step=step)[key]) for key in PROGRESS_KEYS}
    try:
        dcp.save({**_state(arch, optimizer), "progress": progress}, checkpoint_id=temp)
    except Exception as error:  # DCP gathers every rank's failure: all ranks raise
        if not is_disk_full(error):
            raise
        last = latest_checkpoint(output_dir)
        written = path_bytes(temp) if os.path.exists(temp) else 0
        needed = path_bytes(last) if last else written
        dist.barrier()
        if rank == 0 and os.path.exists(temp):
            shutil.rmtree(temp)
        raise DiskFullError(disk_full_message(final, needed or None, last)) from None
    dist.barrier()  # every rank has written its shards (and rank 0 the metadata)
    if rank == 0:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(temp, final)
        found = list_checkpoints(output_dir)
        for old_step, path in found[:-keep_last]:
            if not (keep_every and old_step % keep_every == 0):
                shutil.rmtree(path)
    dist.barrier()
    return final


def load_checkpoint(arch, optimizer, path: str) -> dict:
    """Collective: load a checkpoint saved by any number of processes into this run's shards.

    Returns the saved progress dict (step, global_batch, ...). optimizer may be None (weights only).
    """
    state = {**_state(arch, optimizer), "progress": dict.fromkeys(PROGRESS_KEYS, -1)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(arch.student, state["student"])
    set_model_state_dict(arch.teacher, state["teacher"])
    if optimizer is not None:
        set_optimizer_state_dict(arch.student, optimizer, state["optimizer"])
    for name, center_state in state["centers"].items():
        getattr(arch, name).load_state_dict(center_state, strict=True)
    if arch.gram_teacher is not None:
        set_model_state_dict(arch.gram_teacher, state["gram_teacher"])
    return state["progress"]


def full_state_dict(module: torch.nn.Module) -> dict:
    """Collective: the unsharded state dict of `module` on rank 0 (on CPU), {} on the other ranks."""
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def resolve_run_checkpoint(source: str, step: int | None = None) -> str | None:
    """The dcp_<step> directory of a scale/ run given as "RUN", "RUN@STEP" or RUN with `step` (newest if None);
    None when `source` is not a scale/ run directory (then it may be a dinolite checkpoint or file)."""
    if step is None:
        source, step = parse_run_at_step(source)
    if _NAME.match(os.path.basename(os.path.normpath(source))) and os.path.isdir(source) and step is None:
        return source  # a dcp_<step> directory itself
    if not os.path.isdir(source):
        return None
    found = list_checkpoints(source)
    if not found:
        return None
    if step is None:
        return found[-1][1]
    by_step = dict(found)
    if step not in by_step:
        raise CheckpointError(f"{source} has no checkpoint of step {step} (kept steps: "
                              f"{', '.join(str(s) for s, _ in found)}); keep it with dist.keep_every")
    return by_step[step]


def load_stage_start(arch, optimizer, path: str, weights_only: bool) -> int:
    """Collective: start a new stage (a new config) from another scale/ run's checkpoint, saved by any number of
    processes. weights_only=False: its student, teacher, centering and AdamW state and its step (--continue-from);
    True: its teacher's weights into student and teacher, a fresh AdamW, step 0 (--init-from, as the official
    student.resume_from_teacher_chkpt). Its Gram teacher is never taken (gram.teacher says which). Returns the step."""
    if weights_only:
        state = {"teacher": get_model_state_dict(arch.teacher)}
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(arch.teacher, state["teacher"])
        set_model_state_dict(arch.student, state["teacher"])
        return 0
    state = {key: value for key, value in _state(arch, optimizer).items() if key != "gram_teacher"}
    state["progress"] = dict.fromkeys(PROGRESS_KEYS, -1)
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(arch.student, state["student"])
    set_model_state_dict(arch.teacher, state["teacher"])
    set_optimizer_state_dict(arch.student, optimizer, state["optimizer"])
    for name, center_state in state["centers"].items():
        getattr(arch, name).load_state_dict(center_state, strict=True)
    return int(state["progress"]["step"])


def load_teacher_backbone(backbone, path: str) -> None:
    """Collective: the EMA teacher's backbone of a scale/ checkpoint into a sharded `backbone` (a Gram teacher)."""
    state = {"teacher": {f"backbone.{k}": v for k, v in get_model_state_dict(backbone).items()}}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(backbone, {k[len("backbone."):]: v for k, v in state["teacher"].items()})
