"""Device bugs caught on a CPU (issue 28): collectives on the training device, a rank with no masked patch still
joining Sinkhorn-Knopp's collectives, exports on the CPU, a distillation teacher moved to the students' device,
an unusable GPU as a loud error, SLURM's one-GPU-per-task device. No test here needs a GPU: the 'meta' device
stands in for CUDA (a tensor made without device= lands on the CPU, not on meta), and `ast` reads the code that
runs inside a step for tensor constructors without device=."""
import ast
import pathlib

import pytest
import torch
import torch.distributed as dist

from dinolite import distributed
from dinolite.centering import sinkhorn_knopp
from tests.distributed_utils import run_distributed

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def fake_group_on_meta(monkeypatch):
    """A pretend process group whose collectives record the devices of their tensors (and change nothing)."""
    seen = []

    def record(tensor, *args, **kwargs):
        seen.append(tensor.device.type)
        return None

    monkeypatch.setattr(distributed, "is_enabled", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", record)
    monkeypatch.setattr(dist, "broadcast", record)
    distributed.set_collective_device("meta")
    yield seen
    distributed.set_collective_device(None)


def test_collective_helpers_reject_a_tensor_off_the_training_device(fake_group_on_meta):
    with pytest.raises(RuntimeError, match="tensor on cpu but collectives run on meta"):
        distributed.all_reduce_sum_(torch.zeros(3))
    with pytest.raises(RuntimeError, match="on cpu but collectives run on meta"):
        distributed.broadcast_(torch.zeros(3))
    distributed.all_reduce_max_(torch.zeros(3, device="meta"))
    assert fake_group_on_meta == ["meta"]


class _OnDevice:
    """Anything with a .device: stands for a tensor on a GPU this machine does not have."""

    def __init__(self, device):
        self.device = torch.device(device)


def test_collective_check_compares_the_gpu_index():
    distributed.set_collective_device("cuda:1")
    try:
        with pytest.raises(RuntimeError, match="cuda:0 but collectives run on cuda:1"):
            distributed.check_device(_OnDevice("cuda:0"))
        distributed.check_device(_OnDevice("cuda:1"))
    finally:
        distributed.set_collective_device(None)


def test_sinkhorn_knopp_reduces_only_tensors_on_the_logits_device(fake_group_on_meta):
    """Old code all-reduced torch.tensor(local_batch) made on the CPU: NCCL's first SK step fails."""
    out = sinkhorn_knopp(torch.randn(6, 5, device="meta"), 0.1)
    assert out.device.type == "meta" and out.shape == (6, 5)
    assert fake_group_on_meta and set(fake_group_on_meta) == {"meta"}


# ---------------------------------------------------------------------------------------------------------
# a rank without masked patches


def _teacher_targets_one_rank_unmasked(rank, world_size):
    from dinolite.train import apply_overrides, get_config
    from dinolite.train.meta_arch import DINOv2MetaArch
    from tests.test_train import MICRO, micro_batch

    cfg = apply_overrides(get_config("tiny-cpu"), MICRO + ["loss.centering=sinkhorn_knopp"])
    torch.manual_seed(0)
    arch = DINOv2MetaArch(cfg)
    batch = micro_batch(cfg)
    if rank == 1:  # no masked patch on this rank
        batch["mask_indices"] = batch["mask_indices"][:0]
        batch["masks_weight"] = batch["masks_weight"][:0]
    targets = arch.teacher_targets(batch, 0.07, __import__("contextlib").nullcontext)
    alone = None
    if rank == 0:  # rank 0's rows with rank 1 holding none = one process holding rank 0's rows
        with torch.no_grad():
            out = arch.teacher.backbone.forward_features(batch["global_crops"])
            patches = out["x_norm_patchtokens"].flatten(0, 1)[batch["mask_indices"]]
            logits = arch.teacher.ibot_head(patches).float()
        alone = logits
    return targets["ibot"], alone


def test_a_rank_without_masked_patches_joins_sinkhorn_knopp():
    """Old code skipped SK (and its all-reduces) on a rank with no masked patch: the other rank waited forever.
    The group's timeout turns that hang into a failure here."""
    (ibot0, logits0), (ibot1, _) = run_distributed(_teacher_targets_one_rank_unmasked, 2, timeout_s=60)
    assert ibot1.shape[0] == 0 and ibot0.shape[0] > 0
    torch.testing.assert_close(ibot0, sinkhorn_knopp(logits0, 0.07), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------
# no tensor made on the CPU inside a step

# Code that runs inside a training step (or makes tensors for a collective): every torch.tensor / zeros / ones /
# arange / full / empty there names its device. Module constructors (__init__) are exempt: .to(device) moves them.
STEP_MODULES = [
    "dinolite/centering.py", "dinolite/distributed.py", "dinolite/ema.py", "dinolite/gram_teacher.py",
    "dinolite/losses/dino.py", "dinolite/losses/gram.py", "dinolite/losses/ibot.py", "dinolite/losses/koleo.py",
    "dinolite/models.py", "dinolite/train/meta_arch.py", "dinolite/train/distill.py", "dinolite/train/loop.py",
    "scale/train.py", "scale/parallelize.py",
]
CONSTRUCTORS = {"tensor", "zeros", "ones", "arange", "full", "empty", "rand", "randn", "linspace"}


def _constructors_without_device(path, root=ROOT):
    tree = ast.parse((root / path).read_text())
    found = []

    def visit(node, in_init):
        for child in ast.iter_child_nodes(node):
            init = in_init or (isinstance(child, ast.FunctionDef) and child.name == "__init__")
            if (isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute)
                    and child.func.attr in CONSTRUCTORS and isinstance(child.func.value, ast.Name)
                    and child.func.value.id == "torch" and not init
                    and not any(k.arg == "device" for k in child.keywords)):
                found.append(f"{path}:{child.lineno} torch.{child.func.attr}")
            visit(child, init)

    visit(tree, False)
    return found


@pytest.mark.parametrize("path", STEP_MODULES)
def test_step_code_makes_tensors_on_a_named_device(path):
    """Old code: centering.py made SK's counts on the CPU, scale/parallelize.py the init check's flag."""
    assert _constructors_without_device(path) == []


def test_the_device_check_sees_a_constructor_without_device(tmp_path):
    source = "import torch\nclass A:\n    def __init__(self):\n        self.a = torch.zeros(1)\n" \
             "def f(x):\n    return torch.zeros(1, device=x.device) + torch.tensor(2.0)\n"
    (tmp_path / "m.py").write_text(source)
    assert _constructors_without_device("m.py", tmp_path) == ["m.py:6 torch.tensor"]


# ---------------------------------------------------------------------------------------------------------
# devices: unusable GPU, SLURM's one GPU per task


def test_an_unusable_gpu_is_a_loud_error(monkeypatch):
    """Old code: device=auto with a GPU torch cannot use (old driver) trained on the CPU without a word."""
    from dinolite.train import run

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(run, "gpu_present", lambda: True)
    with pytest.raises(run.UnusableGPUError, match="a GPU is present but torch .* cannot use it.*train.device=cpu"):
        run.resolve_device("auto")
    with pytest.raises(run.UnusableGPUError, match="train.device=cuda:0 but torch cannot use a GPU"):
        run.resolve_device("cuda:0")
    monkeypatch.setattr(run, "gpu_present", lambda: False)
    assert run.resolve_device("auto") == torch.device("cpu")
    assert run.resolve_device("cpu") == torch.device("cpu")


def test_the_cli_exits_2_on_an_unusable_gpu(monkeypatch, capsys, tmp_path):
    from dinolite.train import run
    from dinolite.train.__main__ import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(run, "gpu_present", lambda: True)
    assert main(["--config", "tiny-cpu", "--data", "builtin:n=8,size=32", "--output-dir", str(tmp_path / "run"),
                 "train.epochs=1", "train.progress=false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: a GPU is present")


def test_local_rank_wraps_around_the_visible_gpus():
    """Old code: cuda:LOCAL_RANK, an invalid device under SLURM with one GPU visible per task."""
    from scale.parallelize import local_cuda_device

    assert local_cuda_device(3, 1) == torch.device("cuda", 0)
    assert local_cuda_device(3, 4) == torch.device("cuda", 3)
    assert local_cuda_device(5, 4) == torch.device("cuda", 1)
    with pytest.raises(RuntimeError, match="no GPU is visible"):
        local_cuda_device(0, 0)


# ---------------------------------------------------------------------------------------------------------
# exports and the distillation teacher


class _GPUTensor:
    """Stands for a CUDA tensor in a state dict: records where export_official sends it."""
    is_meta = False

    def __init__(self):
        self.sent_to = None

    def detach(self):
        return self

    def to(self, device):
        self.sent_to = str(device)
        return "copy on " + str(device)


def test_exports_copy_every_tensor_to_the_cpu():
    """Old code returned the model's own tensors: CUDA tensors in teacher_backbone_official.pth, which a plain
    torch.load cannot read on a machine without CUDA."""
    from dinolite import hub, models

    model = models.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=1)
    state = hub.export_official(model)
    assert all(t.device.type == "cpu" and not t.requires_grad for t in state.values())
    on_gpu = {k: _GPUTensor() for k in state}
    model.state_dict = lambda: on_gpu
    exported = hub.export_official(model)
    assert {t.sent_to for t in on_gpu.values()} == {"cpu"} and set(exported.values()) == {"copy on cpu"}


def test_distillation_moves_a_passed_in_teacher_to_its_device(tmp_path):
    """Old code kept a passed-in teacher where it was (the CPU) while the batches went to the GPU."""
    from dinolite.train.distill import DistillArch, load_frozen_teacher
    from tests.test_distill import distill_cfg, teacher_file

    cfg = distill_cfg(teacher_file(tmp_path))
    teacher = load_frozen_teacher(cfg, "cpu")
    arch = DistillArch(cfg, "meta", teacher)
    assert {p.device.type for p in arch.teacher.parameters()} == {"meta"}
    assert {p.device.type for p in arch.students.parameters()} == {"meta"}


# ---------------------------------------------------------------------------------------------------------
# the notebooks' GPU branches (chapters 7, 9, 10: FAST = not torch.cuda.is_available())


def test_gram_teacher_patch_features_take_images_from_any_device():
    """Old code fed the images as given: CPU images into a GPU-trained backbone (chapter 9) failed. 'meta' stands
    for the GPU: the images go to the backbone's device and the features come back from there."""
    from dinolite import models
    from dinolite.gram_teacher import GramTeacher

    backbone = models.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=1).to("meta")
    feats = GramTeacher(backbone).patch_features(torch.randn(2, 3, 32, 32))
    assert feats.device.type == "meta" and feats.shape == (2, 16, 32)


MODEL_CALL = ("arch.", ".backbone(", "forward_features(", "patch_features(")
RANDOM_INPUT = ("torch.randn(", "torch.rand(", "torch.zeros(", "torch.ones(", "torch.empty(")


def _code_cells(chapter):
    import json

    path = next((ROOT / "book").glob(f"{chapter:02d}_*.ipynb"))
    return [(i, "".join(c["source"])) for i, c in enumerate(json.loads(path.read_text())["cells"])
            if c["cell_type"] == "code"]


@pytest.mark.parametrize("chapter", [7, 9, 10])
def test_notebook_cells_give_trained_models_inputs_on_their_device(chapter):
    """On a GPU, chapters 7, 9 and 10 train on CUDA. A cell that makes an input tensor and calls a trained model
    names the device (old chapter 7: a CPU input into the CUDA teacher); a helper that calls forward_features
    itself moves its images to the backbone's device (old chapter 10: patch_grids); features of GPU backbones
    are brought to the CPU before they meet CPU features (old chapter 9: gram_loss of CUDA and CPU features)."""
    problems = []
    for i, src in _code_cells(chapter):
        if not any(m in src for m in MODEL_CALL) or "torch.device(\"meta\")" in src:
            continue
        for line in src.splitlines():
            if any(r in line for r in RANDOM_INPUT) and "device=" not in line:
                problems.append(f"cell {i}: {line.strip()}")
        if ".forward_features(" in src and "def " in src and ".to(next(" not in src:
            problems.append(f"cell {i}: a helper calls forward_features without moving its input to the model")
        if "refined[" in src and "patch_features(" in src and ".cpu()" not in src:
            problems.append(f"cell {i}: GPU-trained features meet CPU features")
    assert problems == []


# ---------------------------------------------------------------------------------------------------------
# the prepared GPU check


def test_the_gpu_check_covers_every_gpu_path(tmp_path):
    from scale.gpu_check import checks

    gpu = {name: (commands, limit) for name, commands, limit in checks(str(tmp_path), cpu=False)}
    assert sum(limit for _, limit in gpu.values()) <= 1500  # each bounded; together ~10 min on an H100
    loop = " ".join(gpu["loop"][0][0])
    assert "vits16-imagenette-1gpu" in loop and "train.epoch_length=60" in loop and "sinkhorn_knopp" in loop
    scale = [" ".join(c) for c in gpu["scale"][0]]
    assert "--stop-at-step" in scale[0] and "selective" in scale[0] and "--stop-at-step" not in scale[1]
    assert any("scale.export" in c for c in scale)
    assert "dist.compile=true" in " ".join(gpu["compile"][0][0])
    assert gpu["vitg"][0] == [["bash", "scale/smoke_gpu.sh"]]
    assert {"book/07_training.ipynb", "book/09_gram_anchoring.ipynb", "book/10_distillation.ipynb"} <= \
        set(gpu["chapters"][0][0])


def test_the_gpu_check_refuses_to_run_without_a_gpu(monkeypatch, capsys):
    from scale import gpu_check

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 2
    assert "--cpu-dry-run" in capsys.readouterr().err


def test_the_gpu_check_dry_run_prints_its_table(tmp_path):
    import subprocess
    import sys

    done = subprocess.run(["bash", "scale/smoke_gpu.sh", "--check", "--cpu-dry-run", "--only", "vitg,compile",
                           "--keep", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stdout + done.stderr
    table = done.stdout.split("last line\n")[1].splitlines()
    assert [row.split()[:2] for row in table] == [["compile", "skipped"], ["vitg", "ok"]]
    assert (tmp_path / "check.log").exists()


# ---------------------------------------------------------------------------------------------------------
# feeding a GPU: pinned memory, /dev/shm


def test_the_loader_pins_memory_for_a_gpu_and_warns_when_dev_shm_is_short(monkeypatch, tmp_path):
    import collections
    import shutil

    from dinolite.train import get_config, run

    cfg = get_config("vits16-imagenette-1gpu")
    # 64 images x 4 bytes x 3 x (2 x 224^2 + 8 x 96^2) = 134 MB a batch; 8 workers x 2 prefetched batches
    assert run.shared_memory_need(cfg, 8) == 8 * 2 * 64 * 4 * 3 * (2 * 224 ** 2 + 8 * 96 ** 2)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(64 * 2**20, 0, 64 * 2**20))
    with pytest.warns(UserWarning, match=r"holds 64 MB but 8 data workers need about 2040 MB.*--shm-size=3g"):
        run.warn_if_shared_memory_short(cfg, 8, str(tmp_path))
    loader = run.make_loader(list(range(3)), 0, torch.device("cuda"))
    assert loader.pin_memory and not run.make_loader(list(range(3)), 0, torch.device("cpu")).pin_memory
