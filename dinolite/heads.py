"""The DINO projection head: backbone feature -> K prototype scores.

    x [..., D] -> MLP (Linear-GELU-Linear-GELU-Linear) -> [..., bottleneck]
               -> L2-normalise                         -> [..., bottleneck], unit norm
               -> last layer Linear(bottleneck, K, bias=False) -> [..., K] logits

Because the last layer sees unit vectors, logit k is the cosine between the bottleneck vector and
prototype k, times the prototype's norm. DINOv2 weight-normalises the last layer
(w_k = g_k * v_k / ||v_k||, g initialised to 1 and trainable); DINOv3 uses a plain linear layer.

Official sizes, as keyword choices (pass them with `DINOHead(in_dim, **HEAD_SIZES[name])`):

| name             | out_dim (K) | hidden_dim | bottleneck_dim | last layer    |
|------------------|-------------|------------|----------------|---------------|
| dinov2           | 65536       | 2048       | 256            | weight norm   |
| dinov2_large     | 131072      | 2048       | 384            | weight norm   | (ViT-L/g)
| dinov3_7b_dino   | 262144      | 8192       | 512            | plain linear  |
| dinov3_7b_ibot   | 98304       | 4096       | 384            | plain linear  |
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

HEAD_SIZES = {
    "dinov2": dict(out_dim=65536, hidden_dim=2048, bottleneck_dim=256, weight_norm_last_layer=True),
    "dinov2_large": dict(out_dim=131072, hidden_dim=2048, bottleneck_dim=384, weight_norm_last_layer=True),
    "dinov3_7b_dino": dict(out_dim=262144, hidden_dim=8192, bottleneck_dim=512, weight_norm_last_layer=False),
    "dinov3_7b_ibot": dict(out_dim=98304, hidden_dim=4096, bottleneck_dim=384, weight_norm_last_layer=False),
}


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight normalisation per output row: w_k = g_k * v_k / ||v_k||.

    Parameters are named `weight_g` [out, 1] and `weight_v` [out, in], the layout that
    `torch.nn.utils.weight_norm` produces, so a state dict exports to the official
    `last_layer.weight_g` / `last_layer.weight_v` keys unchanged. g starts at 1 (every
    prototype has unit norm, logits are cosines) and is trainable.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.trunc_normal_(self.weight_v, std=0.02)

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight [out, in] (no eps in the norm, like torch's weight_norm)."""
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight_norm=True"


class DINOHead(nn.Module):
    """Projection head used by the DINO ([CLS]) and iBOT (patch) losses.

    Args:
        in_dim: backbone embedding size D.
        out_dim: number of prototypes K.
        hidden_dim: width of the hidden MLP layers.
        bottleneck_dim: size of the L2-normalised vector fed to the prototype layer.
        n_layers: number of Linear layers in the MLP (1: a single Linear(in_dim, bottleneck_dim)).
        weight_norm_last_layer: True for DINOv2 (weight-normalised prototypes), False for DINOv3.
    """

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, n_layers: int = 3, weight_norm_last_layer: bool = True):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim), ("hidden_dim", hidden_dim),
                            ("bottleneck_dim", bottleneck_dim)):
            if value < 1:
                raise ValueError(f"{name} must be a positive size, got {value}")
        if n_layers == 1:
            # Officially a bare Linear: its keys are mlp.weight / mlp.bias, not mlp.0.*.
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            dims = [in_dim] + [hidden_dim] * (n_layers - 1) + [bottleneck_dim]
            layers = []
            for i in range(n_layers):
                layers.append(nn.Linear(dims[i], dims[i + 1]))
                if i < n_layers - 1:
                    layers.append(nn.GELU())
            self.mlp = nn.Sequential(*layers)
        if weight_norm_last_layer:
            self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        else:
            self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)
        self.in_dim, self.out_dim, self.bottleneck_dim = in_dim, out_dim, bottleneck_dim
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Truncated normal (std 0.02) for every weight, zero biases, weight-norm g = 1.

        Safe to call after building on the meta device and `.to_empty()`.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, WeightNormLinear):
                nn.init.trunc_normal_(module.weight_v, std=0.02)
                module.weight_g.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_dim] -> logits [..., out_dim]."""
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"DINOHead expects inputs [..., {self.in_dim}], got {tuple(x.shape)}")
        x = self.mlp(x)
        # As officially: a larger eps under fp16, where 1e-12 underflows to 0.
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        x = F.normalize(x, dim=-1, p=2, eps=eps)
        return self.last_layer(x)


def num_parameters(module: nn.Module) -> int:
    """Number of scalar parameters (handy in the book)."""
    return sum(math.prod(p.shape) for p in module.parameters())
