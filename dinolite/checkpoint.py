"""Atomic training checkpoints (ground floor: imports nothing from dinolite): write to a temporary file in the same directory, then rename.

`os.replace` within one directory is atomic on POSIX and Windows, so a crash while saving
leaves either the previous checkpoint or the new one, never a truncated file. Files are
named checkpoint_<step>.pth (zero-padded) and only the newest `keep_last` are kept.
A process killed mid-write (SIGKILL, power loss) cannot clean up its temporary file; the next
run removes such leftovers with `remove_stale_temp_files`.
"""
import errno
import os
import re
import shutil
import tempfile
import warnings

import torch

_NAME = re.compile(r"^checkpoint_(\d+)\.pth$")
# atomic_save's temporary files: ".tmp_" + the checkpoint's name + mkstemp's random characters.
_TEMP_NAME = re.compile(r"^\.tmp_checkpoint_\d+\.pth\w+$")


def checkpoint_path(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, f"checkpoint_{step:08d}.pth")


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """[(step, path), ...] sorted by step, ignoring temporary and unrelated files."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _NAME.match(name)
        if match:
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def latest_checkpoint(output_dir: str) -> str | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def remove_stale_temp_files(output_dir: str) -> list[str]:
    """Delete the temporary files of checkpoint saves that never finished; returns their paths.

    Only names atomic_save creates for checkpoints (.tmp_checkpoint_<step>.pth<random>) are
    touched, never a complete checkpoint_<step>.pth. Call it when no save is in progress in
    `output_dir` (at the start of a run).
    """
    if not os.path.isdir(output_dir):
        return []
    removed = []
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if _TEMP_NAME.match(name) and os.path.isfile(path):
            os.remove(path)
            removed.append(path)
    return removed


class DiskFullError(OSError):
    """A checkpoint or export could not be written for lack of space; the message says what is intact and the fix."""

    def __init__(self, message: str):
        super().__init__(message)
        self.errno = errno.ENOSPC


def umask_mode(mode: int = 0o666) -> int:
    """`mode` filtered by the process's umask: what open() gives a new file (mkstemp gives 0600 instead)."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def path_bytes(path: str) -> int:
    """Size of a file, or of all files under a directory (a DCP checkpoint)."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def is_disk_full(error: BaseException) -> bool:
    """True for ENOSPC / EDQUOT, also when wrapped (torch.save's "unexpected pos" RuntimeError, DCP's
    CheckpointException): the error, its causes, and the text of wrapped per-rank failures."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(error)
        if "No space left on device" in text or "Disk quota exceeded" in text or "unexpected pos" in text:
            return True
        error = error.__cause__ or error.__context__
    return False


def disk_full_message(path: str, needed: int | None, last_intact: str | None) -> str:
    """One line: the file being written, the space it needs against what is free, the last intact checkpoint, the fix."""
    directory = os.path.dirname(os.path.abspath(path))
    free = shutil.disk_usage(directory).free
    need = f"it needs about {_megabytes(needed)}" if needed else "its size is unknown"
    intact = (f"the last intact checkpoint is {last_intact} (nothing was removed)" if last_intact
              else "no checkpoint was written yet")
    return (f"disk full while writing {path}: {need}, {_megabytes(free)} free on {directory}; {intact}. "
            "Free some space (or lower train.keep_last, the number of checkpoints kept), then run the same "
            "command again to resume")


def warn_if_low_space(output_dir: str, checkpoint_bytes: int, keep_last: int) -> str | None:
    """Before the first write: warn (and return the message) when the free space holds fewer than keep_last + 1
    checkpoints of `checkpoint_bytes` (the newest is written before the oldest is removed)."""
    needed = (keep_last + 1) * checkpoint_bytes
    free = shutil.disk_usage(output_dir).free
    if free >= needed:
        return None
    message = (f"only {_megabytes(free)} free on {os.path.abspath(output_dir)}, a checkpoint takes about "
               f"{_megabytes(checkpoint_bytes)} and train.keep_last={keep_last} keeps {keep_last} (+1 while "
               f"saving): {_megabytes(needed)}. Free some space or lower train.keep_last before the disk fills")
    warnings.warn(message, stacklevel=2)
    return message


def atomic_save(obj, path: str, last_intact: str | None = None) -> None:
    """torch.save `obj` to `path` so that `path` is either the old file or the complete new one.

    The file gets the umask's mode (as torch.save(obj, path) would), not mkstemp's 0600. A full disk raises
    DiskFullError (one line: the size needed against the free space, `last_intact`, the fix) after removing the
    temporary file; nothing else is touched.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp_" + os.path.basename(path), dir=directory)
    try:
        os.fchmod(fd, umask_mode())
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        written = os.path.getsize(tmp) if os.path.exists(tmp) else 0
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(error, Exception) and is_disk_full(error):
            needed = path_bytes(last_intact) if last_intact and os.path.exists(last_intact) else None
            raise DiskFullError(disk_full_message(path, needed or written or None, last_intact)) from None
        raise


def save_checkpoint(state: dict, output_dir: str, step: int, keep_last: int = 3) -> str:
    """Save `state` as checkpoint_<step>.pth atomically, then delete all but the newest `keep_last`."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    os.makedirs(output_dir, exist_ok=True)
    path = checkpoint_path(output_dir, step)
    atomic_save(state, path, last_intact=latest_checkpoint(output_dir))
    for _, old in list_checkpoints(output_dir)[:-keep_last]:
        os.remove(old)
    return path


def load_checkpoint(path: str, map_location="cpu") -> dict:
    # weights_only=False: the state holds plain Python containers and numbers we wrote ourselves.
    return torch.load(path, map_location=map_location, weights_only=False)


def weights_only_state(state: dict, dtype=None) -> dict:
    """A training checkpoint without its optimiser state (AdamW keeps two moments per weight: half the size), with
    the floating-point weights optionally cast to `dtype`: enough to continue training with a fresh optimiser
    (train(..., continue_from=...)), to anchor to (GramTeacher.load) or to evaluate."""
    def cast(tree):
        if isinstance(tree, dict):
            return {k: cast(v) for k, v in tree.items()}
        if dtype is not None and isinstance(tree, torch.Tensor) and tree.is_floating_point():
            return tree.to(dtype)
        return tree

    return {k: cast(v) for k, v in state.items() if k != "optimizer"}


class CheckpointError(ValueError):
    """A checkpoint to continue from, or to take a Gram teacher from, is missing or does not fit."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint file, run directory or step does not exist."""


def parse_run_at_step(source: str) -> tuple[str, int | None]:
    """"runs/x@200" -> ("runs/x", 200); anything else -> (source, None)."""
    run, _, step = source.rpartition("@")
    return (run, int(step)) if run and step.isdigit() else (source, None)


def resolve_checkpoint(source: str, step: int | None = None) -> str:
    """The checkpoint file `source` itself, or checkpoint_<step>.pth of the run directory `source`
    (its newest checkpoint if step is None). `source` may be "RUN@STEP" (then step must be None).
    Errors name what exists."""
    if step is None and not os.path.isfile(source):
        source, step = parse_run_at_step(source)
    if os.path.isfile(source):
        if step is not None:
            raise CheckpointError(f"{source} is a file; a step ({step}) only selects a checkpoint in a run directory")
        return source
    if not os.path.isdir(source):
        raise CheckpointNotFoundError(f"checkpoint {source!r} not found: give a run directory (with "
                                      "checkpoint_<step>.pth files) or a checkpoint file")
    found = list_checkpoints(source)
    if not found:
        raise CheckpointNotFoundError(f"{source} holds no checkpoint_<step>.pth file")
    if step is None:
        return found[-1][1]
    path = checkpoint_path(source, step)
    if not os.path.isfile(path):
        kept = ", ".join(str(s) for s, _ in found)
        raise CheckpointNotFoundError(f"{source} has no checkpoint of step {step} (kept steps: {kept}); a run keeps "
                                      "only its last train.keep_last checkpoints, so copy a checkpoint you will need "
                                      "later (e.g. an early Gram teacher) before it is deleted")
    return path
