"""The recorded real-photo runs (benchmarks/results/, made by benchmarks/ablate_photos.py on Imagenette and
Imagewoof, which are not in the repository): the recipe they measured, the early warning replayed on their kNN
curves, and the tables in benchmarks/README.md that are printed from them."""
import dataclasses
import importlib.util
import json
import os

import pytest

from dinolite.report import early_warnings
from dinolite.train import apply_overrides, get_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
SETS = ("folder:imagenette32", "folder:imagewoof32", "folder:imagenette64")


def load(name: str) -> list:
    with open(os.path.join(RESULTS, name)) as f:
        return [json.loads(line) for line in f if line.strip()]


def ablate_photos():
    spec = importlib.util.spec_from_file_location("ablate_photos", os.path.join(ROOT, "benchmarks", "ablate_photos.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_small_photos_is_the_row_the_photo_runs_measured():
    # The runs are recorded as tiny-cpu + base lr 0.003 in fp32; the recipe is that with precision auto,
    # which resolves to fp32 at width 96 on a CPU (chapter 7 reads those rows as the recipe).
    recipe = dataclasses.asdict(get_config("small-photos"))
    measured = dataclasses.asdict(apply_overrides(get_config("tiny-cpu"), ["optim.base_lr=0.003"]))
    assert measured["train"].pop("precision") == "fp32" and recipe["train"].pop("precision") == "auto"
    assert recipe == measured
    assert ablate_photos().ROWS["lr0.003"][1:3] == ("tiny-cpu", ["optim.base_lr=0.003"])


def replay(curve: list) -> list:
    """[(step, message)]: the warnings the training loop's kNN rule gives on a recorded [[step, kNN], ...] curve,
    evaluated at the curve's cadence (dinolite-report's replay of the loop's BelowStartWarning)."""
    return [(step, said) for _, step, said in early_warnings([{"step": s, "knn_top1": v} for s, v in curve])]


def test_below_start_warning_is_silent_on_the_photo_recipe_and_fires_on_a_broken_run():
    runs = load("photos_5016.jsonl")
    healthy = [r for r in runs if r["row"] == "lr0.003" and r["data"] in SETS]
    assert len(healthy) >= 9  # 3 seeds on each set
    for r in healthy:
        assert len(r["curve"]) >= 8 and r["curve"][0][1] == r["knn_init"]
        assert replay(r["curve"]) == [], (r["data"], r["seed"])
    (broken,) = [r for r in runs if r["row"] == "broken-lr30"]  # 30 x the recipe's lr
    said = replay(broken["curve"])
    assert len(said) == 1 and "below its first value" in said[0][1] and "optim.base_lr" in said[0][1]
    same_set = [r for r in healthy if r["data"] == broken["data"]]
    assert broken["knn_end"] < broken["knn_init"] - 5 and min(r["gain"] for r in same_set) > 10  # broken vs healthy


def markdown_tables(text: str) -> list:
    """The markdown tables of `text`, each as a list of its lines."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    return tables


@pytest.mark.parametrize("results, steps, data", [
    ("photos_5016.jsonl", 5016, "folder:imagenette32"),
    ("photos_5016.jsonl", 5016, "folder:imagewoof32"),
    ("photos_5016.jsonl", 5016, "folder:imagenette64"),
    ("photos_500.jsonl", 500, "folder:imagenette32"),
    ("photos_500.jsonl", 500, "folder:imagewoof32"),
    ("photos_500.jsonl", 1000, "folder:imagenette32"),
])
def test_benchmark_readme_tables_are_the_recorded_results(results, steps, data):
    table = ablate_photos().table(os.path.join(RESULTS, results), steps, data)
    rows = [line for line in table.splitlines() if line.startswith("|")]
    with open(os.path.join(ROOT, "benchmarks", "README.md")) as f:
        assert rows in markdown_tables(f.read()), f"benchmarks/README.md lacks the table:\n{table}"
