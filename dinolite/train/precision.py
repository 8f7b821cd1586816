"""train.precision: "auto" picks bf16 where bf16 is native and faster, fp32 elsewhere.

    resolve_precision("auto", torch.device("cpu"), width=192)   # -> "bf16" or "fp32"

Rule (measured, see README "dinolite vs Lightly"):
- CUDA: bf16 (tensor cores; the losses stay in fp32 either way).
- CPU with AMX tiles (Intel Sapphire Rapids and later): bf16. oneDNN's AMX kernels run bf16 matmuls
  several times faster than fp32.
- CPU with AVX512-BF16 but no AMX (e.g. AMD Zen 4, Intel Cooper Lake): a short measured probe decides,
  once per process and width: fp32 unless a bf16-autocast Linear forward + backward of the model's
  width is at least BF16_MARGIN times faster. On the AMD EPYC (AVX512-BF16, no AMX) we measured bf16
  slower than fp32 for these small ViTs, so auto gives fp32 there.
- Any other CPU (AVX2, AVX-512 without BF16): fp32. bf16 matmuls are emulated there, slower than fp32.

The capability checks are torch.cpu._is_amx_tile_supported() and torch.cpu._is_avx512_bf16_supported();
torch.backends.cpu.get_cpu_capability() says "AVX512" on both kinds of AVX-512 CPU, so it cannot tell.
"""
import functools
import time

import torch

PRECISIONS = ("auto", "bf16", "fp32")
BF16_MARGIN = 1.1  # bf16 must be this much faster than fp32 in the probe (noise on a busy machine)


def cpu_bf16_support() -> str:
    """"amx", "avx512_bf16" or "none": the CPU's native bf16 matmul support."""
    if torch.cpu._is_amx_tile_supported():
        return "amx"
    if torch.cpu._is_avx512_bf16_supported():
        return "avx512_bf16"
    return "none"


@functools.lru_cache(maxsize=None)
def bf16_probe_speedup(width: int, rows: int = 2048, repeats: int = 5) -> float:
    """fp32 time / bf16-autocast time of Linear(width, 4 width) forward + backward on [rows, width] (CPU).

    Interleaved repeats after one warm-up each; the fastest of each is compared (the least disturbed by
    other processes on a busy machine). Cached per process and width."""
    generator = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(width, 4 * width)
    x = torch.randn(rows, width, generator=generator)

    def run(dtype):
        layer.zero_grad(set_to_none=True)
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            y = layer(x)
        y.float().square().mean().backward()
        return time.perf_counter() - start

    times = {"fp32": [], "bf16": []}
    for repeat in range(repeats + 1):
        for dtype in times:
            seconds = run(dtype)
            if repeat:
                times[dtype].append(seconds)
    return min(times["fp32"]) / min(times["bf16"])


def resolve_precision(precision: str, device: torch.device, width: int = 384) -> str:
    """"bf16" or "fp32" for train.precision on `device` (width: the model's embed_dim, for the probe)."""
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16"
    if device.type != "cpu":
        return "fp32"
    support = cpu_bf16_support()
    if support == "amx":
        return "bf16"
    if support == "avx512_bf16":
        return "bf16" if bf16_probe_speedup(int(width)) >= BF16_MARGIN else "fp32"
    return "fp32"


def describe_precision(precision: str, device: torch.device, width: int = 384) -> str:
    """One line for the log: what "auto" resolved to and why."""
    resolved = resolve_precision(precision, device, width)
    if precision != "auto":
        return f"precision {resolved}"
    if device.type != "cpu":
        return f"precision auto -> {resolved} ({device.type})"
    support = cpu_bf16_support()
    why = {"amx": "CPU with AMX", "none": "CPU without native bf16 (bf16 would be emulated)"}.get(support)
    if why is None:
        why = (f"CPU with AVX512-BF16, no AMX: bf16 measured {bf16_probe_speedup(int(width)):.2f}x the speed of "
               f"fp32 at width {width}, needs {BF16_MARGIN}x")
    return f"precision auto -> {resolved} ({why})"
