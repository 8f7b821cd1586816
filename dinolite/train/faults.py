"""What a long run meets, handled the same way by every trainer (dinolite.train.loop, dinolite.train.distill,
scale/train.py): SIGTERM before a preemption, steps whose loss or gradient is not finite, a disk too small for
the checkpoints, and errors shown as one line at a command line."""
import signal
import threading

import torch

from dinolite import distributed
from dinolite.checkpoint import latest_checkpoint, warn_if_low_space

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, what the shell reports for a job killed by SIGTERM: not finished


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradient norm was not finite for train.max_nonfinite steps in a row."""


def one_line(error: BaseException) -> str:
    """The message of an error for `error: ...` at a CLI. An error raised in a DataLoader worker arrives wrapped
    ("Caught X in DataLoader worker process 0. Original Traceback ... X: message"): its last line, unwrapped."""
    text = str(error).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text




class Preemption:
    """SIGTERM (SLURM's warning before it kills a job; submitit then requeues it): finish the step, checkpoint, stop.

    Steps installs the handler while its loop runs (main thread only) and restores the previous one after.
    `signals` are the signals that stop the run (default SIGTERM; scale/launch_slurm.py adds submitit's
    time-limit signal, SIGUSR2, so that the run saves at a step boundary before submitit requeues it).
    `now(done)` says whether the run stops after `done` completed steps; with several processes the ranks
    agree first (an all-reduce of the flag on the training device, once per step), so all stop at the same
    step and write the same checkpoint. `stopped_at` is that step (None: not stopped).
    """

    def __init__(self, device: torch.device | None = None, signals: tuple = (signal.SIGTERM,)):
        self.device = device or torch.device("cpu")
        self.signals = tuple(signals)
        self.signalled, self.stopped_at = None, None  # signalled: the name of the signal that arrived
        self._answers, self._previous = {}, {}

    def _handler(self, signum, frame):
        self.signalled = signal.Signals(signum).name

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handler) for sig in self.signals}

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def now(self, done: int) -> bool:
        if done not in self._answers:
            number = int(signal.Signals[self.signalled]) if self.signalled else 0
            if distributed.get_world_size() > 1:  # every rank learns the signal one of them got
                tensor = torch.tensor([number], dtype=torch.int32, device=self.device)
                distributed.all_reduce_(tensor, op=torch.distributed.ReduceOp.MAX)
                number = int(tensor.item())
            self._answers = {done: number > 0}
            if number:
                self.stopped_at, self.signalled = done, signal.Signals(number).name
        return self._answers[done]

    def message(self, output_dir: str | None, checkpoint: str | None) -> str:
        where = (f"checkpoint {checkpoint} written; run the same command again to resume" if checkpoint
                 else "no output directory, nothing saved")
        return f"stopped by {self.signalled} after step {self.stopped_at}: {where}"


class NonFiniteSteps:
    """One rule for every trainer: a step whose loss or gradient norm is not finite is skipped (no optimiser or
    EMA update; the step function decides with `finite`), and train.max_nonfinite such steps in a row stop the
    run with NonFiniteLossError naming the last good checkpoint."""

    def __init__(self, max_in_a_row: int, output_dir: str | None = None, latest=latest_checkpoint):
        self.max_in_a_row, self.output_dir, self._latest = max_in_a_row, output_dir, latest
        self.in_a_row = 0

    def update(self, finite: bool, done: int, loss: float, grad_norm: float) -> None:
        self.in_a_row = 0 if finite else self.in_a_row + 1
        if self.in_a_row < self.max_in_a_row:
            return
        last = self._latest(self.output_dir) if self.output_dir else None
        resume = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        raise NonFiniteLossError(
            f"loss or gradient not finite for {self.in_a_row} steps in a row (last: step {done}, loss {loss}, "
            f"grad norm {grad_norm}; those steps were skipped, train.max_nonfinite={self.max_in_a_row}); {resume}. "
            "Lower optim.base_lr, check the data, or use train.precision=fp32 (a changed config needs a new "
            "--output-dir)")


def finite(*values: torch.Tensor) -> bool:
    """Whether every value (a loss, a gradient norm) is finite: one host sync."""
    return bool(torch.stack([v.detach().float().reshape(()) for v in values]).isfinite().all())


def checkpoint_bytes(*modules: torch.nn.Module, optimizer_copies: int = 2) -> int:
    """About the size of a training checkpoint: the modules' weights and buffers, plus AdamW's two moments of every
    trainable weight of the first module (the student). DTensor parameters count their full size."""
    def nbytes(tensors):
        return sum(t.numel() * t.element_size() for t in tensors)

    total = sum(nbytes(m.state_dict().values()) for m in modules)
    return total + optimizer_copies * sum(p.numel() * 4 for p in modules[0].parameters() if p.requires_grad)


def warn_low_disk(run_dir, checkpoint_size: int, keep_last: int) -> None:
    """Before the first write (main process): warn when the disk holds fewer than keep_last + 1 checkpoints."""
    if run_dir.path and run_dir.is_main:
        warn_if_low_space(run_dir.path, checkpoint_size, keep_last)
