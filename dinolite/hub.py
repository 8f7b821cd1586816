"""Load and export official DINOv2 / DINOv3 backbone checkpoints, strictly and offline.

Official key layout (DINOv2): cls_token [1,1,D], pos_embed [1,1+M*M,D], register_tokens [1,R,D],
mask_token [1,D], patch_embed.proj.*, blocks.N.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.*,ls2.gamma},
norm.*; MLP as mlp.fc1/fc2, SwiGLU as mlp.w12/w3. Training checkpoints chunk the blocks
(blocks.C.N.*, N is still the global block index) and wrap everything in {"teacher": {"backbone.*", heads}}.
DINOv3 adds: storage_tokens (= our register_tokens), rope_embed.periods, attn.qkv.bias_mask,
mlp.w1/w2/w3, local_cls_norm.*.

Nothing here downloads: from_pretrained reads a local file or the torch.hub cache and tells you
which file to fetch if it is missing.
"""
import os
import re
from pathlib import Path

import torch
from torch import Tensor

from . import models

__all__ = ["load_official", "export_official", "from_pretrained", "official_to_dinolite", "HUB_MODELS",
           "DINOV3_ARCHS", "hub_filename", "hub_url"]

_CHUNKED_BLOCK = re.compile(r"^blocks\.(\d+)\.(\d+)\.(.+)$")


def _unwrap(state_dict: dict) -> dict:
    """Return the backbone's tensors of a hub file or a training checkpoint.

    {"teacher": {...}} / {"model": {...}} wrappers are opened; if keys carry a "backbone." prefix only
    those are kept (the others are the DINO/iBOT heads, which are not part of the backbone).
    """
    for wrapper in ("teacher", "model"):
        if wrapper in state_dict and isinstance(state_dict[wrapper], dict):
            state_dict = state_dict[wrapper]
    if any(k.startswith("backbone.") for k in state_dict):
        state_dict = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
    return state_dict


def official_to_dinolite(key: str) -> str:
    """Map one official key to ours: blocks.C.N.x -> blocks.N.x, storage_tokens -> register_tokens."""
    chunked = _CHUNKED_BLOCK.match(key)
    if chunked:
        return f"blocks.{chunked.group(2)}.{chunked.group(3)}"
    if key == "storage_tokens":
        return "register_tokens"
    return key  # every other official name is also ours


def _hints(model: models.VisionTransformer, missing: list[str], unexpected: list[str],
           mismatched: list[tuple[str, tuple, tuple]]) -> list[str]:
    """Guess the constructor arguments that would make the checkpoint fit."""
    hints = []
    for name, theirs, _ in mismatched:
        if name == "pos_embed" and len(theirs) == 3:
            grid = round((theirs[1] - 1) ** 0.5)
            hints.append(f"was the model built with img_size={grid * model.patch_size}?")
        if name == "register_tokens":
            hints.append(f"was the model built with num_register_tokens={theirs[1]}?")
    if "register_tokens" in unexpected:
        hints.append("the checkpoint has register tokens: build with num_register_tokens=4 "
                     "(and interpolate_offset=0.0, interpolate_antialias=True for the DINOv2 _reg models)?")
    if "register_tokens" in missing:
        hints.append("the checkpoint has no register tokens: build with num_register_tokens=0?")
    if any(".mlp.w12." in k for k in unexpected):
        hints.append('the checkpoint uses a fused SwiGLU (mlp.w12): build with ffn="swiglu"?')
    elif any(".mlp.w1." in k for k in unexpected):
        hints.append('the checkpoint uses a DINOv3 SwiGLU (mlp.w1/w2/w3): build with ffn="swiglu64"?')
    elif any(".mlp.fc1." in k for k in unexpected):
        hints.append('the checkpoint uses an MLP (mlp.fc1/fc2): build with ffn="mlp"?')
    if any(k.endswith(".ls1.gamma") for k in unexpected):
        hints.append("the checkpoint has LayerScale: build with layerscale_init set (1.0 for hub models)?")
    if "pos_embed" in unexpected:
        hints.append('the checkpoint has a learned position table: build with pos_embed="learned"?')
    if "rope_embed.periods" in unexpected:
        hints.append('the checkpoint uses RoPE: build with pos_embed="rope"?')
    if any(k.endswith("qkv.bias_mask") for k in unexpected):
        hints.append("the checkpoint masks the key bias: build with mask_k_bias=True?")
    if any(k.startswith("local_cls_norm.") for k in unexpected):
        hints.append("the checkpoint has local_cls_norm: build with untie_global_and_local_cls_norm=True?")
    block_ids = {int(k.split(".")[1]) for k in unexpected if k.startswith("blocks.")}
    if block_ids and min(block_ids) >= len(model.blocks):
        hints.append(f"the checkpoint has {max(block_ids) + 1} blocks: build with depth={max(block_ids) + 1}?")
    return hints


def load_official(model: models.VisionTransformer, state_dict: dict) -> models.VisionTransformer:
    """Load an official DINOv2/DINOv3 backbone state dict into model, strictly. Returns model.

    Accepts hub files, chunked training checkpoints (blocks.C.N.*) and {"teacher": {"backbone.*": ...}}
    checkpoints. Raises ValueError listing every missing key, unexpected key and shape mismatch, and
    for a DINOv3 file a model whose LayerNorm eps is not 1e-5.
    """
    source = _unwrap(state_dict)
    if ("storage_tokens" in source or "rope_embed.periods" in source) and model.norm_eps != 1e-5:
        # Strict loading cannot catch this: eps is no tensor, and a 1e-6 model gives other features.
        raise ValueError(f"a DINOv3 checkpoint (storage tokens / RoPE) needs LayerNorm eps 1e-5, the model has "
                         f"{model.norm_eps:g}: build it with norm_eps=1e-5 (the default for pos_embed='rope')")
    mapped: dict[str, Tensor] = {}
    for key, tensor in source.items():
        ours = official_to_dinolite(key)
        if ours in mapped:
            raise ValueError(f"two checkpoint keys map to {ours!r} (one of them is {key!r})")
        mapped[ours] = tensor
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in mapped)
    unexpected = sorted(k for k in mapped if k not in expected)
    mismatched = [(k, tuple(mapped[k].shape), tuple(expected[k].shape))
                  for k in sorted(expected) if k in mapped and mapped[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        lines = ["checkpoint does not fit the model (loading is strict):"]
        lines += [f"  missing key: {k}" for k in missing]
        lines += [f"  unexpected key: {k}" for k in unexpected]
        lines += [f"  shape mismatch: {k}: checkpoint {theirs} vs model {ours}" for k, theirs, ours in mismatched]
        lines += [f"  hint: {h}" for h in _hints(model, missing, unexpected, mismatched)]
        raise ValueError("\n".join(lines))
    model.load_state_dict(mapped, strict=True)
    return model


def export_official(model: models.VisionTransformer) -> dict[str, Tensor]:
    """Our state dict in the official layout (DINOv2 names; RoPE models use DINOv3's storage_tokens), on the CPU
    whatever the model's device, so that a file saved from it loads with a plain torch.load on a machine
    without a GPU (a model on 'meta' gives meta tensors: the layout and shapes)."""
    out = {}
    for key, tensor in model.state_dict().items():
        if key == "register_tokens" and model.rope_embed is not None:
            key = "storage_tokens"
        out[key] = tensor.detach() if tensor.is_meta else tensor.detach().to("cpu")  # meta: shapes only
    return out


# ----------------------------------------------------------------------------- hub models (DINOv2, DINOv3)

_HUB_BASE_URL = "https://dl.fbaipublicfiles.com/dinov2"
_ARCHS = {"s": models.vit_small, "b": models.vit_base, "l": models.vit_large, "g": models.vit_giant2}
DINOV2_MODELS = [f"dinov2_vit{a}14{reg}" for a in _ARCHS for reg in ("", "_reg")]


# ----------------------------------------------------------------------------- DINOv3 hub models
# The released LVD-1689M backbones (all patch 16, 4 storage tokens, RoPE base 100 with rescale 2 in training,
# LayerScale, LayerNorm eps 1e-5, key-bias mask): name -> (dim, depth, heads, FFN, FFN ratio, file hash).
# SwiGLU here is DINOv3's w1/w2/w3 layout; 2/3 x ratio x dim is already a multiple of 64 for each model.
_DINOV3_BASE_URL = "https://dl.fbaipublicfiles.com/dinov3"
DINOV3_ARCHS = {
    "dinov3_vits16": (384, 12, 6, "mlp", 4.0, "08c60483"),
    "dinov3_vits16plus": (384, 12, 6, "swiglu64", 6.0, "4057cbaa"),
    "dinov3_vitb16": (768, 12, 12, "mlp", 4.0, "73cec8be"),
    "dinov3_vitl16": (1024, 24, 16, "mlp", 4.0, "8aa4cbdd"),
    "dinov3_vitl16plus": (1024, 24, 16, "swiglu64", 6.0, "46503df0"),
    "dinov3_vith16plus": (1280, 32, 20, "swiglu64", 6.0, "7c1da9a5"),
    "dinov3_vit7b16": (4096, 40, 32, "swiglu64", 3.0, "a955f4ea"),  # no qkv bias, untied local-CLS norm
}
HUB_MODELS = DINOV2_MODELS + list(DINOV3_ARCHS)


def _check_name(name: str) -> None:
    if name not in HUB_MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(HUB_MODELS)}")


def hub_filename(name: str) -> str:
    """dinov2_vits14 -> dinov2_vits14_pretrain.pth, dinov2_vits14_reg -> dinov2_vits14_reg4_pretrain.pth,
    dinov3_vits16 -> dinov3_vits16_pretrain_lvd1689m-08c60483.pth."""
    _check_name(name)
    if name in DINOV3_ARCHS:
        return f"{name}_pretrain_lvd1689m-{DINOV3_ARCHS[name][-1]}.pth"
    base = name.removesuffix("_reg")
    return f"{base}_reg4_pretrain.pth" if name.endswith("_reg") else f"{base}_pretrain.pth"


def hub_url(name: str) -> str:
    """Official download address of a hub backbone (DINOv3's are served after accepting its license)."""
    if name in DINOV3_ARCHS:
        return f"{_DINOV3_BASE_URL}/{name}/{hub_filename(name)}"
    return f"{_HUB_BASE_URL}/{name.removesuffix('_reg')}/{hub_filename(name)}"


def build_hub_model(name: str) -> models.VisionTransformer:
    """The architecture of a hub model, randomly initialised. DINOv2: img_size 518, LayerScale 1.0;
    DINOv3: RoPE, 4 storage tokens, eps 1e-5, key-bias mask (and the 7B's specifics)."""
    _check_name(name)
    if name in DINOV3_ARCHS:
        dim, depth, heads, ffn, ratio, _ = DINOV3_ARCHS[name]
        is_7b = name == "dinov3_vit7b16"
        return models.VisionTransformer(
            img_size=224, patch_size=16, embed_dim=dim, depth=depth, num_heads=heads, ffn=ffn, ffn_ratio=ratio,
            qkv_bias=not is_7b, num_register_tokens=4, pos_embed="rope", rope_rescale_coords=2.0,
            layerscale_init=1e-5, mask_k_bias=True, untie_global_and_local_cls_norm=is_7b, norm_eps=1e-5)
    constructor = _ARCHS[name[len("dinov2_vit")]]
    kwargs = dict(img_size=518, patch_size=14, layerscale_init=1.0)
    if name.endswith("_reg"):
        kwargs.update(num_register_tokens=4, interpolate_offset=0.0, interpolate_antialias=True)
    return constructor(**kwargs)


def _fetch_hint(name: str) -> str:
    """Where to get the weights of hub model `name` and where to put them."""
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    if name in DINOV3_ARCHS:
        return (f"dinolite never downloads. The DINOv3 weights are given out after accepting Meta's DINOv3 license "
                f"(see the facebookresearch/dinov3 README); the download link you receive ends in "
                f"{hub_filename(name)}. Save the file as {cache / hub_filename(name)} or pass path=... to "
                f"from_pretrained.")
    return (f"dinolite never downloads: fetch {hub_url(name)} and either save it as {cache / hub_filename(name)} "
            f"or pass path=... to from_pretrained, e.g.\n"
            f"  mkdir -p {cache} && curl -L -o {cache / hub_filename(name)} {hub_url(name)}")


def _not_a_checkpoint(name: str, file: Path, expected_bytes: int, problem: str) -> ValueError:
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(64).lstrip()
    if size == 0:
        looks = "the file is empty"
    elif head.startswith(b"<"):
        looks = "it looks like an HTML page (a download that saved an error or login page)"
    elif head.startswith(b"PK"):  # torch.save writes a zip archive
        looks = "it is an incomplete or damaged torch.save archive (an interrupted download?)"
    else:
        looks = "it was not written by torch.save"
    return ValueError(f"{file} is not a PyTorch state dict of {name}: {looks} ({problem}; {size:,} bytes, while "
                      f"the weights of {name} take about {expected_bytes / 1e6:.0f} MB). {_fetch_hint(name)}")


def from_pretrained(name: str, path: str | os.PathLike | None = None) -> models.VisionTransformer:
    """Build a hub model and load its weights from path or the torch.hub cache. Never downloads.

    name: dinov2_vit{s,b,l,g}14, dinov2_vit{s,b,l,g}14_reg, or a DINOv3 name (DINOV3_ARCHS: dinov3_vits16,
    dinov3_vits16plus, dinov3_vitb16, dinov3_vitl16, dinov3_vitl16plus, dinov3_vith16plus, dinov3_vit7b16).
    Returns the model in eval mode.
    A missing file, or one that is not a state dict (an HTML page, a truncated download), is an
    error that says which file to fetch and where to put it.
    """
    _check_name(name)
    file = Path(path) if path is not None else Path(torch.hub.get_dir()) / "checkpoints" / hub_filename(name)
    if not file.is_file():
        raise FileNotFoundError(f"weights for {name} not found at {file}. {_fetch_hint(name)}")
    with torch.device("meta"):
        model = build_hub_model(name)
    expected_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    try:
        state_dict = torch.load(file, map_location="cpu", weights_only=True)
    except OSError:
        raise  # the file cannot be read at all (permissions, I/O); the system's message says so
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError, KeyError, ... here
        raise _not_a_checkpoint(name, file, expected_bytes, f"torch.load failed with {type(error).__name__}") from None
    if not isinstance(state_dict, dict):
        raise _not_a_checkpoint(name, file, expected_bytes, f"torch.load gave a {type(state_dict).__name__}, not a dict")
    model.to_empty(device="cpu")  # no init needed: the strict load below overwrites every tensor
    return load_official(model, state_dict).eval()
