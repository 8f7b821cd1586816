"""dinolite-embed: one [CLS] row per image in the dataset's order, a paths file beside it, one-line errors."""
import numpy as np
import pytest
import torch

from dinolite.data import EvalTransform, build_dataset
from dinolite.embed import main
from dinolite.loading import load_backbone
from tests.cli_helpers import colour_folder, one_error_line, run_module
from tests.tiny_runs import DATA


def test_embeddings_are_each_images_cls_feature_in_order(tiny_run, tmp_path):
    run, _ = tiny_run
    out = tmp_path / "emb.npy"
    assert main(["--checkpoint", str(run), "--data", DATA, "--output", str(out), "--batch-size", "16"]) == 0
    emb = np.load(out)
    dataset = build_dataset(DATA, transform=EvalTransform(32, 32))
    assert emb.shape == (len(dataset), 32) and emb.dtype == np.float32
    model = load_backbone(str(run)).model
    for i in (0, 17, 63):  # one image at a time, outside the batches of 16
        image, label = dataset[i]
        with torch.no_grad():
            expected = model.forward_features(image[None])["x_norm_clstoken"][0]
        torch.testing.assert_close(torch.from_numpy(emb[i]), expected, rtol=1e-4, atol=1e-5)
    lines = (tmp_path / "emb.paths.txt").read_text().splitlines()
    assert len(lines) == len(dataset)
    assert lines[17] == f"{DATA}#17\t{dataset[17][1]}"


def test_folder_paths_file_is_a_list_spec_and_normalize(tiny_run, tmp_path):
    run, _ = tiny_run
    folder = colour_folder(tmp_path / "photos", ["blue", "red"], 3)
    out = tmp_path / "emb.npy"
    assert main(["--checkpoint", str(run), "--data", f"folder:{folder}", "--output", str(out), "--normalize"]) == 0
    emb = np.load(out)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    listed = build_dataset(f"list:{tmp_path / 'emb.paths.txt'}")  # trains or embeds again as it is
    assert [(str(p), l) for p, l in listed.samples] == [(str(folder / c / f"{i}.png"), k)
                                                      for k, c in enumerate(["blue", "red"]) for i in range(3)]


@pytest.mark.parametrize("args, expected", [
    (["--data", "textures:n=4", "--output", "{tmp}/e.txt"], "must end in .npy"),
    (["--data", "textures:n=4", "--output", "{tmp}/no/e.npy"], "does not exist; create it first"),
    (["--data", "list:{tmp}/missing.txt", "--output", "{tmp}/e.npy"], "image list"),
    (["--data", "textures:n=lots", "--output", "{tmp}/e.npy"], "must be an integer"),
    (["--data", "textures:n=4", "--output", "{tmp}/e.npy", "--image-size", "30"], "not a multiple of the patch size 8"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_run, tmp_path, capsys, args, expected):
    run, _ = tiny_run
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert main(["--checkpoint", str(run), *args]) == 2
    assert expected in one_error_line(capsys)
    assert not (tmp_path / "e.npy").exists()


def test_an_existing_output_is_kept(tiny_run, tmp_path, capsys):
    run, _ = tiny_run
    (tmp_path / "e.npy").write_text("mine")
    assert main(["--checkpoint", str(run), "--data", "textures:n=4", "--output", str(tmp_path / "e.npy")]) == 2
    assert "exists; pass --overwrite" in one_error_line(capsys)
    assert (tmp_path / "e.npy").read_text() == "mine"


def test_cli_in_a_subprocess(tiny_run, tmp_path):
    run, _ = tiny_run
    result = run_module("dinolite.embed", "--checkpoint", f"{run}@2", "--data", "textures:n=20,size=32",
                        "--output", tmp_path / "e.npy")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "extracting features" in result.stderr  # the progress bar
    assert "(20 x 32 float32)" in result.stdout and np.load(tmp_path / "e.npy").shape == (20, 32)
    bad = run_module("dinolite.embed", "--checkpoint", tmp_path / "nothing", "--data", "textures", "--output", tmp_path / "x.npy")
    assert bad.returncode == 2 and bad.stderr.startswith("error: checkpoint") and bad.stderr.count("\n") == 1, bad.stderr
