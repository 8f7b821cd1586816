"""dinolite-eval knn|linear: top-1/top-5 of a checkpoint and of the same network at initialisation."""
import pytest

from dinolite.data import EvalTransform, build_dataset
from dinolite.eval import extract_features, knn_classify
from dinolite.evaluate import build_parser, evaluate, main
from dinolite.loading import load_backbone
from tests.cli_helpers import colour_folder, one_error_line, run_module


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """train: blue, green, red (4 each); val: green and red only, so val's class ids (0, 1) are train's (1, 2)."""
    root = tmp_path_factory.mktemp("labelled")
    return (colour_folder(root / "train", ["blue", "green", "red"], 4),
            colour_folder(root / "val", ["green", "red"], 3, seed=1))


def test_knn_equals_the_library_on_the_same_features_and_baseline_is_the_init(tiny_run):
    run, _ = tiny_run
    args = build_parser().parse_args(["knn", "--checkpoint", f"{run}@2", "--train", "textures:n=48,size=32",
                                      "--val", "textures:n=24,size=32,seed=5", "--k", "10"])
    report = evaluate(args)
    backbone = load_backbone(f"{run}@2")
    transform = EvalTransform(32, 32)
    train = build_dataset("textures:n=48,size=32", transform=transform)
    val = build_dataset("textures:n=24,size=32,seed=5", transform=transform)
    for model, row in ((backbone.model, "checkpoint"), (backbone.at_init(), "init")):
        a, b = extract_features(model, train, progress=False), extract_features(model, val, progress=False)
        expected = knn_classify(a["cls"], a["labels"], b["cls"], b["labels"], k=10, num_classes=12)
        assert report[row] == {"top1": pytest.approx(expected["top1"]), "top5": pytest.approx(expected["top5"])}
    assert report["num_classes"] == 12 and report["train_images"] == 48 and report["val_images"] == 24


def test_folder_classes_are_matched_by_name(tiny_run, folders, capsys):
    run, _ = tiny_run
    train, val = folders
    assert main(["knn", "--checkpoint", str(run), "--train", f"folder:{train}", "--val", f"folder:{val}", "--k", "4"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("kNN of ") and "on 6 val images (3 classes, 12 train images, 32 px)" in out[0]
    checkpoint, init = out[2].split(), out[3].split()
    # one colour per class: only matching val's "green" (id 0 there) to train's "green" (id 1) gives 100%
    assert checkpoint == ["checkpoint", "100.0", "-"] and init == ["at", "initialisation", "100.0", "-"]
    assert "top-5 needs more than 5 classes" in out[4]


def test_linear_probe_prints_both_rows(tiny_run, folders, capsys):
    run, _ = tiny_run
    train, val = folders
    assert main(["linear", "--checkpoint", str(run), "--train", f"folder:{train}", "--val", f"folder:{val}",
                 "--epochs", "30"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("linear probe of") and out[2].split()[:2] == ["checkpoint", "100.0"]
    assert out[3].split()[:2] == ["at", "initialisation"]
    assert main(["linear", "--checkpoint", str(run), "--train", f"folder:{train}", "--val", f"folder:{val}",
                 "--epochs", "30", "--no-baseline"]) == 0
    assert "initialisation" not in capsys.readouterr().out


@pytest.mark.parametrize("make_args, expected", [
    (lambda t, v, tmp: ["--train", f"folder:{tmp}", "--val", f"folder:{v}"],
     "has unlabelled images: give a folder with one subfolder per class"),
    (lambda t, v, tmp: ["--train", f"folder:{v}", "--val", f"folder:{t}"], "--val folder:"),
    (lambda t, v, tmp: ["--train", f"folder:{tmp / 'missing'}", "--val", f"folder:{v}"], "does not exist"),
    (lambda t, v, tmp: ["--train", "textures:n=8", "--val", "textures:n=8", "--k", "0"], "--k must be >= 1"),
], ids=["unlabelled", "unknown val class", "missing folder", "bad k"])
def test_bad_input_is_one_line_and_exit_2(tiny_run, folders, tmp_path, capsys, make_args, expected):
    run, _ = tiny_run
    (tmp_path / "x.png").write_bytes((folders[0] / "red" / "0.png").read_bytes())  # an image directly in tmp_path
    args = make_args(*folders, tmp_path)
    assert main(["knn", "--checkpoint", str(run), *args, "--no-baseline"]) == 2
    assert expected in one_error_line(capsys)


def test_scale_run_and_distillation_student(scale_run, distill_run, capsys):
    assert main(["knn", "--checkpoint", str(scale_run), "--train", "textures:n=24,size=32",
                 "--val", "textures:n=12,size=32,seed=5", "--no-baseline"]) == 0
    assert "checkpoint" in capsys.readouterr().out
    run, _ = distill_run
    assert main(["knn", "--checkpoint", str(run), "--student", "small", "--train", "textures:n=24,size=32",
                 "--val", "textures:n=12,size=32,seed=5"]) == 0
    assert "at initialisation" in capsys.readouterr().out


def test_cli_in_a_subprocess(tiny_run, folders):
    run, _ = tiny_run
    train, val = folders
    result = run_module("dinolite.evaluate", "knn", "--checkpoint", run, "--train", f"folder:{train}",
                        "--val", f"folder:{val}", "--k", "4")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "extracting features" in result.stderr and "checkpoint          100.0" in result.stdout
    bad = run_module("dinolite.evaluate", "knn", "--checkpoint", run, "--train", "textures", "--val", "nowhere")
    assert bad.returncode == 2 and bad.stderr.startswith("error: bad --data spec") and bad.stderr.count("\n") == 1
