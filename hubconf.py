"""torch.hub entry points: the official DINOv2 and DINOv3 backbones, built by dinolite, loaded strictly, never downloaded.

    import torch
    model = torch.hub.load("path/to/dinolite", "dinov2_vits14", source="local", weights="dinov2_vits14_pretrain.pth")
    model = torch.hub.load("path/to/dinolite", "dinov3_vits16", source="local", weights="dinov3_vits16_pretrain_lvd1689m-08c60483.pth")
    model = torch.hub.load("path/to/dinolite", "dinov2_vits14", source="local")   # random initialisation
    model = torch.hub.load("path/to/dinolite", "dinov2_vits14", source="local", pretrained=True)  # torch.hub's cache

weights: the released file (official key layout); None gives the architecture at random initialisation.
pretrained=True reads the released file from torch.hub's cache (<hub dir>/checkpoints/<file name>).
A missing or unreadable file is a one-line error naming the file to fetch: nothing is downloaded, ever.
The model is a dinolite.models.VisionTransformer in eval mode (forward_features, get_intermediate_layers, ...).
"""
dependencies = ["torch"]  # torch.hub lists every public callable here as a model: imports stay inside _load


def _load(name: str, weights=None, pretrained: bool = False):
    import os
    from pathlib import Path

    import torch

    from dinolite.hub import build_hub_model, from_pretrained, hub_filename

    if weights is None and not pretrained:
        return build_hub_model(name).eval()
    file = Path(os.path.expanduser(weights)) if weights is not None else (
        Path(torch.hub.get_dir()) / "checkpoints" / hub_filename(name))
    if not file.is_file():
        raise FileNotFoundError(f"weights for {name} not found at {file}; dinolite never downloads: save the released "
                                f"{hub_filename(name)} there (see dinolite.hub.hub_url) or pass weights=PATH")
    try:
        return from_pretrained(name, path=file)
    except ValueError as e:  # not a state dict of this model (an HTML page, a truncated file, another model)
        raise ValueError(" ".join(str(e).split())) from None


def dinov2_vits14(weights=None, pretrained=False):
    """DINOv2 ViT-S/14 (21M parameters)."""
    return _load("dinov2_vits14", weights, pretrained)


def dinov2_vitb14(weights=None, pretrained=False):
    """DINOv2 ViT-B/14 (86M)."""
    return _load("dinov2_vitb14", weights, pretrained)


def dinov2_vitl14(weights=None, pretrained=False):
    """DINOv2 ViT-L/14 (300M)."""
    return _load("dinov2_vitl14", weights, pretrained)


def dinov2_vitg14(weights=None, pretrained=False):
    """DINOv2 ViT-g/14 (1.1B, SwiGLU)."""
    return _load("dinov2_vitg14", weights, pretrained)


def dinov2_vits14_reg(weights=None, pretrained=False):
    """DINOv2 ViT-S/14 with 4 registers."""
    return _load("dinov2_vits14_reg", weights, pretrained)


def dinov2_vitb14_reg(weights=None, pretrained=False):
    """DINOv2 ViT-B/14 with 4 registers."""
    return _load("dinov2_vitb14_reg", weights, pretrained)


def dinov2_vitl14_reg(weights=None, pretrained=False):
    """DINOv2 ViT-L/14 with 4 registers."""
    return _load("dinov2_vitl14_reg", weights, pretrained)


def dinov2_vitg14_reg(weights=None, pretrained=False):
    """DINOv2 ViT-g/14 with 4 registers."""
    return _load("dinov2_vitg14_reg", weights, pretrained)


def dinov3_vits16(weights=None, pretrained=False):
    """DINOv3 ViT-S/16 (LVD-1689M)."""
    return _load("dinov3_vits16", weights, pretrained)


def dinov3_vits16plus(weights=None, pretrained=False):
    """DINOv3 ViT-S+/16 (SwiGLU)."""
    return _load("dinov3_vits16plus", weights, pretrained)


def dinov3_vitb16(weights=None, pretrained=False):
    """DINOv3 ViT-B/16."""
    return _load("dinov3_vitb16", weights, pretrained)


def dinov3_vitl16(weights=None, pretrained=False):
    """DINOv3 ViT-L/16."""
    return _load("dinov3_vitl16", weights, pretrained)


def dinov3_vitl16plus(weights=None, pretrained=False):
    """DINOv3 ViT-L+/16 (SwiGLU)."""
    return _load("dinov3_vitl16plus", weights, pretrained)


def dinov3_vith16plus(weights=None, pretrained=False):
    """DINOv3 ViT-H+/16 (SwiGLU)."""
    return _load("dinov3_vith16plus", weights, pretrained)


def dinov3_vit7b16(weights=None, pretrained=False):
    """DINOv3 ViT-7B/16 (SwiGLU, untied local-CLS norm; about 27 GB in fp32)."""
    return _load("dinov3_vit7b16", weights, pretrained)
