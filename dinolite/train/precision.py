"""train.precision: "auto" picks bf16 where bf16 is native and faster, fp32 elsewhere.

    resolve_precision("auto", torch.device("cpu"), width=192)   # -> "bf16" or "fp32"

Rule (measured, see README "dinolite vs Lightly"):
- CUDA: bf16 (tensor cores; the losses stay in fp32 either way).
- CPU with AMX tiles (Intel Sapphire Rapids and later): bf16. oneDNN's AMX kernels run bf16 matmuls
  several times faster than fp32.
- CPU with AVX512-BF16 but no AMX (e.g. AMD Zen 4, Intel Cooper Lake): a short measured probe decides,
  once per process and shape: fp32 unless one bf16-autocast transformer block (forward + backward) at the
  run's width and global-crop shape is at least BF16_MARGIN times as fast. Measured on an AMD EPYC with
  AVX512-BF16 and no AMX, one thread: tiny-cpu (width 96, 17 tokens, batch 32): probe 0.67-0.72, whole
  step in bf16 0.93-1.0x the speed of fp32, so fp32; ViT-tiny/4 at 32 px (width 192, depth 12, 65 tokens,
  batch 32): probe 1.45-1.49, whole step 1.30-1.37x as fast, so bf16.
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
def bf16_probe_speedup(width: int, num_heads: int, sequences: int, tokens: int, repeats: int = 5) -> float:
    """fp32 time / bf16-autocast time of one transformer block's forward + backward on [sequences, tokens,
    width] (CPU), the shape of the run's global crops.

    A whole block at the run's own shape, not a lone matmul: with few tokens and a small width the casts and
    the per-op overhead decide, and there a large matmul alone says bf16 wins where the training step does
    not. Interleaved repeats after one warm-up each; the least CPU time of each is compared (CPU time:
    steadier than the wall clock on a shared machine). Cached per process and shape."""
    from dinolite.models import Block

    generator = torch.Generator().manual_seed(0)
    block = Block(width, num_heads, 4 * width, layerscale_init=None)
    x = torch.randn(sequences, tokens, width, generator=generator)

    def run(dtype):
        block.zero_grad(set_to_none=True)
        start = time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            y = block(x)
        y.float().square().mean().backward()
        return time.process_time() - start

    times = {"fp32": [], "bf16": []}
    for repeat in range(repeats + 1):
        for dtype in times:
            seconds = run(dtype)
            if repeat:
                times[dtype].append(seconds)
    return min(times["fp32"]) / min(times["bf16"])


def probe_shape(cfg=None) -> tuple[int, int, int, int]:
    """(width, heads, sequences, tokens) of a run's global crops: 2 x batch sequences of 1 + R + (G/p)^2
    tokens. Without a config: ViT-S/16, 224 px, batch 32."""
    if cfg is None:
        return 384, 6, 64, 197
    m = cfg.model
    tokens = 1 + m.num_register_tokens + (cfg.crops.global_size // m.patch_size) ** 2
    return m.embed_dim, m.num_heads, 2 * cfg.train.batch_size, tokens


def resolve_precision(precision: str, device: torch.device, cfg=None) -> str:
    """"bf16" or "fp32" for train.precision on `device` (cfg: the run's Config, for the probe's shape)."""
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
        return "bf16" if bf16_probe_speedup(*probe_shape(cfg)) >= BF16_MARGIN else "fp32"
    return "fp32"


def describe_precision(precision: str, device: torch.device, cfg=None) -> str:
    """One line for the log: what "auto" resolved to and why."""
    resolved = resolve_precision(precision, device, cfg)
    if precision != "auto":
        return f"precision {resolved}"
    if device.type != "cpu":
        return f"precision auto -> {resolved} ({device.type})"
    support = cpu_bf16_support()
    why = {"amx": "CPU with AMX", "none": "CPU without native bf16 (bf16 would be emulated)"}.get(support)
    if why is None:
        width, heads, sequences, tokens = probe_shape(cfg)
        why = (f"CPU with AVX512-BF16, no AMX: a block forward + backward on [{sequences}, {tokens}, {width}] ran "
               f"{bf16_probe_speedup(width, heads, sequences, tokens):.2f}x as fast in bf16, {BF16_MARGIN}x needed")
    return f"precision auto -> {resolved} ({why})"
