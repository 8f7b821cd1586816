"""Session fixtures: tiny runs made once and read back by several test files (tests/tiny_runs.py)."""
import pytest


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A dinolite-train run of 4 steps (kNN and monitors every 2): (run directory, its DINOv2MetaArch)."""
    from tests.tiny_runs import train_dinolite

    run = tmp_path_factory.mktemp("runs") / "tiny"
    arch = train_dinolite(str(run))
    return run, arch


@pytest.fixture(scope="session")
def distill_run(tmp_path_factory):
    """A distillation run of 3 steps with two students, "student" and "small"."""
    from tests.tiny_runs import DISTILL, train_dinolite

    run = tmp_path_factory.mktemp("runs") / "distill"
    arch = train_dinolite(str(run), "tiny-cpu-distill", DISTILL)
    return run, arch


@pytest.fixture(scope="session")
def scale_run(tmp_path_factory):
    """A scale/train.py run of 3 steps in one process: config.yaml with dist:, dcp_00000003/, the exported teacher."""
    from tests.tiny_runs import train_scale

    run = tmp_path_factory.mktemp("runs") / "scale"
    train_scale(str(run))
    return run
