"""train.minutes: fit a run into a wall-clock budget with its schedules intact.

The first steps are timed on a throwaway copy of the start (probe_steps after one warm-up step, with the real data
loader), then the step count is fixed: the budget left after the probe, divided by the measured step time, spread
over the recipe's train.epochs. Every schedule is in epochs (warm-up, teacher temperature, cosine decay, Gram
stage), so the run is the recipe with a shorter (or longer) epoch: the same as setting train.epoch_length by hand.
The decision is written to RUN/minutes.json, so a resumed run keeps its step count instead of measuring again.

    epoch_length, note = fit_to_minutes(cfg, run_dir, time_steps)   # time_steps(n) runs n probe steps
"""
import json
import math
import os
import time

from dinolite.train.config import Config

PROBE_STEPS = 4  # timed steps (after one warm-up step that also starts the data workers)
BUDGET_FILE = "minutes.json"
clock = time.perf_counter  # tests replace it with a fake clock


class BudgetError(ValueError):
    """train.minutes leaves no time for even one epoch of steps."""


def measure_step_seconds(run_steps, probe_steps: int = PROBE_STEPS) -> tuple[float, float]:
    """(seconds per step, seconds the probe took in all). run_steps(n) runs the next n steps."""
    start = clock()
    run_steps(1)  # warm-up: data workers start, kernels are chosen, memory is allocated
    tic = clock()
    run_steps(probe_steps)
    toc = clock()
    return (toc - tic) / probe_steps, toc - start


def steps_for_budget(minutes: float, step_seconds: float, spent_seconds: float, epochs: int) -> int:
    """The epoch length that fills what is left of `minutes` after `spent_seconds` with steps of `step_seconds`."""
    left = minutes * 60 - spent_seconds
    steps = int(left // step_seconds) if step_seconds > 0 else 0
    if steps < epochs:
        raise BudgetError(f"train.minutes={minutes:g} leaves time for {max(steps, 0)} steps (a step takes "
                          f"{step_seconds:.3g} s, measuring it took {spent_seconds:.0f} s), fewer than "
                          f"train.epochs={epochs}: give more minutes, fewer epochs or a smaller model")
    return steps // epochs


def fit_to_minutes(cfg: Config, run_dir, time_steps, probe_steps: int = PROBE_STEPS) -> tuple[int, str]:
    """(epoch_length, a line for the log): reuse RUN/minutes.json of the same budget, else measure and record it."""
    t = cfg.train
    path = run_dir.file(BUDGET_FILE) if run_dir.path else None
    if path and os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        if saved.get("minutes") == t.minutes and saved.get("epochs") == t.epochs:
            return saved["epoch_length"], (f"train.minutes={t.minutes:g}: {t.epochs * saved['epoch_length']} steps, "
                                           f"as fixed when this run started ({path})")
    step_seconds, spent = measure_step_seconds(time_steps, probe_steps)
    epoch_length = steps_for_budget(t.minutes, step_seconds, spent, t.epochs)
    total = t.epochs * epoch_length
    if path and run_dir.is_main:
        with open(path, "w") as f:
            json.dump({"minutes": t.minutes, "epochs": t.epochs, "epoch_length": epoch_length,
                       "step_seconds": step_seconds, "probe_seconds": spent}, f)
    note = (f"train.minutes={t.minutes:g}: a step takes {step_seconds:.3g} s (timed over {probe_steps} steps after a "
            f"warm-up, {spent:.0f} s in all), so this run has {total} steps = {t.epochs} epochs of {epoch_length} "
            f"(train.epoch_length), and its schedules span them; kNN, monitor and checkpoint time is not counted, "
            f"expect about {math.ceil((spent + total * step_seconds) / 60)} min plus those")
    return epoch_length, note
