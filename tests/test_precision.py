"""train.precision=auto: bf16 on CUDA and on CPUs with native, faster bf16; fp32 elsewhere."""
import pytest
import torch

from dinolite.train import apply_overrides, get_config
from dinolite.train import precision as P
from dinolite.train.run import make_autocast

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def fake_cpu(monkeypatch, amx: bool, avx512_bf16: bool, probe_speedup: float | None = None):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    calls = []

    def probe(*shape, **kwargs):
        calls.append(shape)
        if probe_speedup is None:
            raise AssertionError("the probe must not run on this CPU")
        return probe_speedup

    monkeypatch.setattr(P, "bf16_probe_speedup", probe)
    return calls


def test_explicit_precisions_are_kept(monkeypatch):
    fake_cpu(monkeypatch, amx=False, avx512_bf16=False)
    assert P.resolve_precision("bf16", CPU) == "bf16"  # asked for: emulated or not, the user's choice
    assert P.resolve_precision("fp32", CUDA) == "fp32"


def test_auto_is_bf16_on_cuda_and_amx(monkeypatch):
    fake_cpu(monkeypatch, amx=True, avx512_bf16=True)
    assert P.resolve_precision("auto", CUDA) == "bf16"
    assert P.resolve_precision("auto", CPU) == "bf16"
    assert "AMX" in P.describe_precision("auto", CPU)


def test_auto_is_fp32_without_native_bf16(monkeypatch):
    fake_cpu(monkeypatch, amx=False, avx512_bf16=False)  # AVX2 or AVX-512 without BF16: emulated bf16
    assert P.resolve_precision("auto", CPU) == "fp32"
    assert P.cpu_bf16_support() == "none"


@pytest.mark.parametrize("speedup, expected", [(0.93, "fp32"), (1.05, "fp32"), (1.5, "bf16")])
def test_avx512_bf16_without_amx_follows_the_probe(monkeypatch, speedup, expected):
    calls = fake_cpu(monkeypatch, amx=False, avx512_bf16=True, probe_speedup=speedup)
    cfg = get_config("tiny-cpu")  # width 96, 3 heads, batch 32, 32 px crops of 8 px patches
    assert P.resolve_precision("auto", CPU, cfg) == expected
    assert calls == [(96, 3, 64, 17)]  # probed at the run's width and global-crop shape
    assert f"{speedup:.2f}x" in P.describe_precision("auto", CPU, cfg)


def test_unknown_precision_is_a_clear_error():
    with pytest.raises(ValueError, match="train.precision"):
        P.resolve_precision("fp16", CPU)
    with pytest.raises(ValueError, match="'auto', 'bf16' or 'fp32'"):
        apply_overrides(get_config("tiny-cpu"), ["train.precision=fp16"])


def test_auto_config_and_autocast(monkeypatch):
    cfg = apply_overrides(get_config("tiny-cpu"), ["train.precision=auto"])
    assert cfg.train.precision == "auto"
    fake_cpu(monkeypatch, amx=True, avx512_bf16=True)
    with make_autocast(CPU, "auto")():
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    fake_cpu(monkeypatch, amx=False, avx512_bf16=False)
    with make_autocast(CPU, "auto")():
        assert not torch.is_autocast_enabled("cpu")


def test_probe_measures_a_positive_ratio():
    P.bf16_probe_speedup.cache_clear()
    speedup = P.bf16_probe_speedup(32, 2, 4, 17, repeats=1)
    assert speedup > 0
    assert P.bf16_probe_speedup(32, 2, 4, 17, repeats=1) == speedup  # cached per process


def _precision_chosen_per_rank(rank, world_size):
    import scale.parallelize
    from dinolite.train.recipes import get_config

    # A probe that disagrees between processes (as timings on a busy machine can): rank 0's choice must win.
    scale.parallelize.resolve_precision = lambda precision, device, cfg=None: "bf16" if rank == 0 else "fp32"
    cfg = get_config("tiny-cpu")
    cfg.train.precision = "auto"
    return scale.parallelize.precision_on_every_rank(cfg, torch.device("cpu"))


def test_scale_resolves_auto_once_for_every_rank():
    from tests.distributed_utils import run_distributed

    assert run_distributed(_precision_chosen_per_rank, world_size=2) == ["bf16", "bf16"]
