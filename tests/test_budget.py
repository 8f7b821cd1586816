"""train.minutes (dinolite.train.budget): the step count fixed from a measured step time, with a fake clock."""
import json
import warnings

import pytest

from dinolite.train import apply_overrides, get_config, train
from dinolite.train import budget
from dinolite.train.__main__ import main
from tests.cli_helpers import one_error_line
from tests.tiny_runs import TINY

DATA = "textures:n=32,size=32"
QUIET = [o for o in TINY if not o.startswith(("train.epoch_length", "train.knn", "train.epochs"))] + [
    "train.knn_every=0"]


def _fake_clock(monkeypatch, tick: float):
    """budget.clock advances by `tick` seconds at every call: start, after the warm-up step, after the probe."""
    now = [0.0]

    def clock():
        now[0] += tick
        return now[0]

    monkeypatch.setattr(budget, "clock", clock)


def _train(overrides, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the small-batch warning
        return train(apply_overrides(get_config("tiny-cpu"), QUIET + overrides), DATA, knn_data=None, **kwargs)


def test_steps_for_budget_by_hand():
    # 1 minute, 20 s spent probing: 40 s left / 2.5 s per step = 16 steps over 2 epochs = 8 per epoch
    assert budget.steps_for_budget(1, 2.5, 20, epochs=2) == 8
    assert budget.steps_for_budget(1, 2.5, 20, epochs=3) == 5  # 16 // 3
    with pytest.raises(budget.BudgetError, match="leaves time for 1 steps"):
        budget.steps_for_budget(0.5, 9, 20, epochs=2)  # 10 s left: one step of 9 s


def test_measure_calls_the_clock_around_the_timed_steps(monkeypatch):
    _fake_clock(monkeypatch, 10.0)
    ran = []
    step_seconds, spent = budget.measure_step_seconds(ran.append, probe_steps=4)
    assert ran == [1, 4] and step_seconds == 10.0 / 4 and spent == 20.0


def test_minutes_run_equals_the_run_with_that_epoch_length(monkeypatch, tmp_path, capsys):
    _fake_clock(monkeypatch, 10.0)  # a step "takes" 2.5 s and the probe 20 s: 30 s budget -> 4 steps
    arch = _train(["train.minutes=0.5", "train.epochs=2"], output_dir=str(tmp_path / "run"))
    out = capsys.readouterr().out
    assert "train.minutes=0.5: a step takes 2.5 s" in out and "4 steps = 2 epochs of 2" in out
    assert arch.total_steps == 4
    assert json.loads((tmp_path / "run" / "minutes.json").read_text())["epoch_length"] == 2
    plain = _train(["train.epochs=2", "train.epoch_length=2"])  # the probe left no trace: bitwise the same run
    losses = [[r[k] for k in ("loss", "lr", "teacher_temp") if k in r] for r in arch.history if "loss" in r]
    assert losses == [[r[k] for k in ("loss", "lr", "teacher_temp") if k in r] for r in plain.history if "loss" in r]


def test_resumed_minutes_run_keeps_its_step_count(monkeypatch, tmp_path, capsys):
    _fake_clock(monkeypatch, 10.0)
    _train(["train.minutes=0.5", "train.epochs=2"], output_dir=str(tmp_path / "run"), stop_at_step=2)
    monkeypatch.setattr(budget, "clock", lambda: pytest.fail("a resumed run must not measure again"))
    arch = _train(["train.minutes=0.5", "train.epochs=2"], output_dir=str(tmp_path / "run"))
    assert arch.completed_steps == 4 and "as fixed when this run started" in capsys.readouterr().out


def test_too_few_minutes_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    _fake_clock(monkeypatch, 10.0)
    code = main(["--config", "tiny-cpu", "--data", DATA, "--output-dir", str(tmp_path / "run"), *QUIET,
                 "train.minutes=0.3", "train.epochs=2"])
    assert code == 2 and "train.minutes=0.3 leaves time for 0 steps" in one_error_line(capsys)
