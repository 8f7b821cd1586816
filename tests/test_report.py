"""dinolite-report: one self-contained HTML page per run, warnings replayed with the loop's rules, gaps stated."""
import importlib.util
import json
import re
import shutil

import pytest

from dinolite.report import early_warnings, main
from tests.cli_helpers import ROOT, one_error_line, run_module


def _page(path) -> str:
    text = path.read_text()
    assert not re.search(r'src="(?!data:image/png;base64,)', text), "every image is inlined"
    assert "<link" not in text and "<script" not in text
    return text


def test_early_warnings_follow_the_loops_rules():
    records = [{"step": 0, "knn_top1": 50.0}, {"step": 10, "knn_top1": 49.0}, {"step": 20, "knn_top1": 51.0},
               {"step": 30, "knn_top1": 40.0}, {"step": 40, "knn_top1": 30.0}, {"step": 50, "knn_top1": 20.0},
               {"step": 10, "monitor/effective_rank": 10.0}, {"step": 20, "monitor/effective_rank": 5.5},
               {"step": 30, "monitor/effective_rank": 4.9}, {"step": 40, "monitor/effective_rank": 4.0}]
    events = early_warnings(records)
    # kNN: below 50 at 10, back above at 20, then below at 30 and 40 -> warned once, at 40.
    # rank: below half of 10 (5.0) at 30 and 40 -> at 40; 5.5 is not below half.
    assert [(key, step) for key, step, _ in events] == [("knn_top1", 40), ("monitor/effective_rank", 40)]
    assert "getting worse than where it started" in events[0][2]


def test_dinolite_run_report_has_every_piece(tiny_run, tmp_path, capsys):
    run, _ = tiny_run
    copy = tmp_path / "tiny"
    shutil.copytree(run, copy)
    with open(copy / "metrics.jsonl", "a") as f:  # a falling kNN, as a run going wrong would log it
        for step, top1 in ((5, 1.0), (6, 0.5)):
            f.write(json.dumps({"step": step, "knn_top1": top1}) + "\n")
    assert main([str(copy), "--data", "textures:n=40,size=32", "--pool", "30"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {copy / 'report.html'}"  # no figure style problems
    page = _page(copy / "report.html")
    for piece in ("Training curves", "total loss per logged step", "weighted kNN top-1", "collapse monitors",
                  "Early warnings", "step 6: the teacher&#x27;s kNN top-1 (%) is 0.5", "principal components",
                  "attention of the [CLS] token",
                  "Nearest neighbours", "nearest neighbours of 4 queries", "Config", "embed_dim: 32"):
        assert piece in page, piece
    assert "Not shown" not in page and "Figure style problems" not in page
    assert page.count("data:image/png;base64,") == 8  # loss, terms, kNN, monitors, PCA, 2 attention, retrieval


def test_distillation_and_scale_runs_and_what_is_missing(distill_run, scale_run, tmp_path):
    run, _ = distill_run
    assert main([str(run), "--output", str(tmp_path / "d.html")]) == 0
    page = _page(tmp_path / "d.html")
    assert "A distillation run" in page and "student &#x27;student&#x27;" in page and "weighted kNN top-1" in page
    assert "the first images of textures:n=64,size=32" in page and "Not shown: retrievals" not in page  # data.txt
    no_spec = tmp_path / "no_spec"
    shutil.copytree(run, no_spec, ignore=shutil.ignore_patterns("data.txt"))  # a run trained on a dataset object
    assert main([str(no_spec), "--output", str(tmp_path / "n.html")]) == 0
    page = _page(tmp_path / "n.html")
    assert "Not shown: retrievals need a pool of the run&#x27;s images: pass --data SPEC." in page
    assert "photographs bundled with scikit-image" in page
    only_dcp = tmp_path / "g14"
    shutil.copytree(scale_run, only_dcp, ignore=shutil.ignore_patterns("teacher_backbone_official.pth"))
    assert main([str(only_dcp)]) == 0
    page = _page(only_dcp / "report.html")
    assert "A scale run" in page and "total loss per logged step" in page and "dist:" in page
    assert "weighted kNN top-1" in page and "collapse monitors" in page  # scale/ logs both now
    assert "no backbone to look at" in page and "python -m scale.export" in page


def test_not_a_run_is_one_line_and_exit_2(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "is not a run directory (no config.yaml)" in one_error_line(capsys)


def test_cli_in_a_subprocess_and_the_browser_check(tiny_run, tmp_path):
    run, _ = tiny_run
    shutil.copytree(run, tmp_path / "tiny")
    result = run_module("dinolite.report", "tiny", "--data", "textures:n=40,size=32", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == "wrote tiny/report.html\n"
    spec = importlib.util.spec_from_file_location("book_check_browser", ROOT / ".ci/book_check_browser.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    if not shutil.which("chromium") and not shutil.which("chromium-browser"):
        pytest.skip("chromium is not installed (.ci/run installs it for the browser check)")
    code = check.main(["--page", str(tmp_path / "tiny" / "report.html"), "--screenshots", str(tmp_path / "shots")])
    assert code == 0
