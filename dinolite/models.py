"""The Vision Transformer backbone of DINOv2 and DINOv3, in one readable file.

Token sequence of one image: [CLS] + R register ("storage") tokens + N patch tokens.

    x [B, 3, H, W] --patch_embed--> [B, N, D]    (N = (H/p) * (W/p))
                   --mask token, [CLS], position embedding, registers--> [B, 1+R+N, D]
                   --depth x Block--> --LayerNorm--> dict of features

Position information is either a learned table (DINOv2: one row for [CLS] and one per patch of
a 37 x 37 grid, interpolated bicubically to other grids; registers get none) or rotary
embeddings applied to the patch tokens' queries and keys (DINOv3 RoPE).

Shapes in docstrings: B batch, T tokens, N patch tokens, R registers, D embed_dim,
h x w patch grid, Dh head dim.
"""
import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "VisionTransformer", "Block", "Attention", "Mlp", "SwiGLUFFN", "LayerScale", "PatchEmbed",
    "RopePositionEmbedding", "rope_apply", "interpolate_pos_embed", "drop_path", "check_image_size",
    "vit_tiny", "vit_small", "vit_base", "vit_large", "vit_giant2", "vit_7b",
]


# ----------------------------------------------------------------------------- input checks

def check_image_size(height: int, width: int, patch_size: int) -> None:
    """Raise a ValueError naming the nearest valid sizes if height/width are not multiples of patch_size."""
    bad = [(name, size) for name, size in (("height", height), ("width", width)) if size % patch_size]
    if not bad:
        return

    def choices(size: int) -> str:
        lower, upper = size // patch_size * patch_size, (size // patch_size + 1) * patch_size
        return f"{lower} or {upper}" if lower > 0 else f"{upper}"

    if height == width:
        hints = [f"use {choices(height)}"]
    else:
        hints = [f"use {choices(size)} for the {name}" for name, size in bad]
    raise ValueError(
        f"image size {height}x{width} is not a multiple of the patch size {patch_size}; "
        + "; ".join(hints) + " (resize or crop)"
    )


# ----------------------------------------------------------------------------- small layers

class PatchEmbed(nn.Module):
    """Cut the image into non-overlapping p x p patches and project each to D: [B,3,H,W] -> [B,N,D]."""

    def __init__(self, patch_size: int = 14, in_chans: int = 3, embed_dim: int = 384):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        check_image_size(x.shape[-2], x.shape[-1], self.patch_size)
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, D, h, w] -> [B, h*w, D], row-major grid


class LayerScale(nn.Module):
    """Per-channel learned scale of a residual branch (CaiT): x * gamma, gamma [D] starts at init_value."""

    def __init__(self, dim: int, init_value: float = 1e-5):
        super().__init__()
        self.init_value = init_value
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_value)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: zero the whole residual branch of a random p-fraction of samples.

    x: [B, ...]. Survivors are scaled by 1/(1-p) so the expectation is unchanged. Identity in eval.
    """
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2, hidden = D * ffn_ratio."""

    def __init__(self, dim: int, hidden: int, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    """SwiGLU feed-forward: w3(silu(x W1) * (x W2)).

    layout "w12" (DINOv2): one fused Linear w12 [2*hidden, D] whose first half is W1, then w3.
    layout "w1w2" (DINOv3): separate w1 and w2 [hidden, D], then w3.
    """

    def __init__(self, dim: int, hidden: int, bias: bool = True, layout: str = "w12"):
        super().__init__()
        if layout not in ("w12", "w1w2"):
            raise ValueError(f"SwiGLU layout must be 'w12' or 'w1w2', got {layout!r}")
        self.layout = layout
        if layout == "w12":
            self.w12 = nn.Linear(dim, 2 * hidden, bias=bias)
        else:
            self.w1 = nn.Linear(dim, hidden, bias=bias)
            self.w2 = nn.Linear(dim, hidden, bias=bias)
        self.w3 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.layout == "w12":
            gate, value = self.w12(x).chunk(2, dim=-1)
        else:
            gate, value = self.w1(x), self.w2(x)
        return self.w3(F.silu(gate) * value)


def swiglu_hidden_dim(dim: int, ffn_ratio: float, align: int) -> int:
    """SwiGLU keeps the MLP's parameter budget: hidden = 2/3 * D * ratio, rounded up to a multiple of align."""
    hidden = int(int(dim * ffn_ratio) * 2 / 3)
    return (hidden + align - 1) // align * align


# ----------------------------------------------------------------------------- rotary position embedding

def rope_rotate_half(x: Tensor) -> Tensor:
    """[x1, x2] -> [-x2, x1] on the last dim (halves)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rope_apply(x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    """Rotate pairs (x_i, x_{i+Dh/2}) by the angles whose sin/cos are given. x [..., T, Dh], sin/cos [T, Dh]."""
    return x * cos + rope_rotate_half(x) * sin


class RopePositionEmbedding(nn.Module):
    """DINOv3 axial RoPE: sin/cos tables [h*w, Dh] for a patch grid (no learned weights).

    periods[i] = base ** (2i / (Dh/2)), i < Dh/4 (a persistent buffer, like the official checkpoint).
    Coordinates per axis: (arange(0.5, n) / n) * 2 - 1, i.e. patch centres in [-1, 1].
    Angle of axis a, frequency i: 2*pi * coord_a / periods[i]; the Dh/4 angles of the row axis and the
    Dh/4 of the column axis are concatenated (Dh/2 angles) and repeated twice to cover Dh.
    In training mode the coordinates can be augmented (in this order): shift by U(-s, s) per axis,
    per-axis jitter by a factor log-uniform in [1/j, j], and a shared log-uniform rescale in [1/r, r].
    """

    def __init__(self, embed_dim: int, num_heads: int, base: float = 100.0, shift_coords: float | None = None,
                 jitter_coords: float | None = None, rescale_coords: float | None = None):
        super().__init__()
        head_dim = embed_dim // num_heads
        if embed_dim % (4 * num_heads):
            raise ValueError(f"RoPE needs a head dim divisible by 4, got embed_dim {embed_dim} / {num_heads} heads")
        self.head_dim, self.base = head_dim, base
        self.shift_coords, self.jitter_coords, self.rescale_coords = shift_coords, jitter_coords, rescale_coords
        self.register_buffer("periods", torch.empty(head_dim // 4), persistent=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.periods.is_meta:
            return  # filled by init_weights() after to_empty()
        exponents = 2 * torch.arange(self.head_dim // 4, dtype=torch.float32, device=self.periods.device)
        self.periods.copy_(self.base ** (exponents / (self.head_dim // 2)))

    @property
    def augments(self) -> bool:
        return self.training and any(v is not None for v in (self.shift_coords, self.jitter_coords, self.rescale_coords))

    def coords(self, h: int, w: int) -> Tensor:
        """Patch-centre coordinates [h*w, 2] (row, col) in [-1, 1], augmented in training mode."""
        device = self.periods.device
        ys = torch.arange(0.5, h, device=device, dtype=torch.float32) / h * 2 - 1
        xs = torch.arange(0.5, w, device=device, dtype=torch.float32) / w * 2 - 1
        coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1)
        if self.training:
            if self.shift_coords is not None:
                coords = coords + torch.empty(2, device=device).uniform_(-self.shift_coords, self.shift_coords)
            if self.jitter_coords is not None:
                log_j = math.log(self.jitter_coords)
                coords = coords * torch.empty(2, device=device).uniform_(-log_j, log_j).exp()
            if self.rescale_coords is not None:
                log_r = math.log(self.rescale_coords)
                coords = coords * torch.empty(1, device=device).uniform_(-log_r, log_r).exp()
        return coords

    def forward(self, h: int, w: int) -> tuple[Tensor, Tensor]:
        """Return (sin, cos), each [h*w, Dh] in fp32."""
        angles = 2 * math.pi * self.coords(h, w)[:, :, None] / self.periods.float()  # [h*w, 2, Dh/4]
        angles = angles.flatten(1, 2).tile(2)  # [h*w, Dh]
        return angles.sin(), angles.cos()


# ----------------------------------------------------------------------------- learned position embedding

def interpolate_pos_embed(pos_embed: Tensor, h: int, w: int, offset: float = 0.1, antialias: bool = False) -> Tensor:
    """Resize a learned position table [1, 1+M*M, D] (CLS row + M x M grid) to [1, 1+h*w, D].

    Bicubic, computed in fp32, returned in pos_embed's dtype. Unchanged if (h, w) == (M, M).
    offset > 0: F.interpolate(scale_factor=((h+offset)/M, (w+offset)/M)) (original DINOv2 models);
    offset == 0: F.interpolate(size=(h, w)) (register models, with antialias=True).
    """
    num_grid = pos_embed.shape[1] - 1
    m = int(math.sqrt(num_grid))
    if m * m != num_grid:
        raise ValueError(f"pos_embed has {num_grid} grid rows, not a square number")
    if (h, w) == (m, m):
        return pos_embed
    cls_row, grid = pos_embed[:, :1], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    grid = grid.float().reshape(1, m, m, dim).permute(0, 3, 1, 2)  # [1, D, M, M]
    if offset:
        resize = dict(scale_factor=((h + offset) / m, (w + offset) / m))
    else:
        resize = dict(size=(h, w))
    grid = F.interpolate(grid, mode="bicubic", antialias=antialias, **resize)
    if grid.shape[-2:] != (h, w):
        raise RuntimeError(f"interpolation gave grid {tuple(grid.shape[-2:])}, expected {(h, w)}")
    grid = grid.permute(0, 2, 3, 1).reshape(1, h * w, dim).to(pos_embed.dtype)
    return torch.cat([cls_row, grid], dim=1)


# ----------------------------------------------------------------------------- attention and block

class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and F.scaled_dot_product_attention.

    mask_k_bias (DINOv3): the qkv layer carries a buffer bias_mask [3D] that multiplies its bias
    (the official checkpoints have zeros over the key part: keys get no bias).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True,
                 mask_k_bias: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.mask_k_bias = mask_k_bias and qkv_bias
        if self.mask_k_bias:
            self.qkv.register_buffer("bias_mask", torch.ones(3 * dim))
            self.reset_bias_mask()

    def reset_bias_mask(self) -> None:
        if self.mask_k_bias:
            dim = self.qkv.in_features
            self.qkv.bias_mask.fill_(1.0)
            self.qkv.bias_mask[dim:2 * dim] = 0.0

    def qkv_projection(self, x: Tensor) -> Tensor:
        if self.mask_k_bias:
            return F.linear(x, self.qkv.weight, self.qkv.bias * self.qkv.bias_mask.to(self.qkv.bias.dtype))
        return self.qkv(x)

    def attend(self, qkv: Tensor, batch: int, rope: tuple[Tensor, Tensor] | None, num_prefix: int,
               return_attention: bool = False) -> Tensor:
        """qkv [B*T, 3D] of same-length sequences -> output [B*T, D] (or probabilities [B, heads, T, T])."""
        q, k, v = qkv.view(batch, -1, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x [B, H, T, Dh]
        if rope is not None:
            sin, cos = rope
            q_patch = rope_apply(q[:, :, num_prefix:].float(), sin, cos).to(q.dtype)
            k_patch = rope_apply(k[:, :, num_prefix:].float(), sin, cos).to(k.dtype)
            q = torch.cat([q[:, :, :num_prefix], q_patch], dim=2)
            k = torch.cat([k[:, :, :num_prefix], k_patch], dim=2)
        if return_attention:
            return torch.softmax((q.float() @ k.float().transpose(-2, -1)) * self.head_dim ** -0.5, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, T, Dh]
        return out.transpose(1, 2).reshape(-1, self.num_heads * self.head_dim)

    def forward_list(self, xs: Tensor, shapes: list[tuple[int, int]], ropes: list, num_prefix: int) -> Tensor:
        """xs [sum_i B_i*T_i, D]: tokens of several crop groups concatenated; attention within each group."""
        if len(shapes) == 1:
            return self.proj(self.attend(self.qkv_projection(xs), shapes[0][0], ropes[0], num_prefix))
        # Several groups: split the inputs (views), not the qkv output, so that the backward joins the
        # D-wide input gradients of the groups rather than the 3D-wide qkv gradients (a third of the copy).
        chunks = xs.split([b * t for b, t in shapes])
        outs = [self.attend(self.qkv_projection(c), b, rope, num_prefix) for c, (b, _), rope in zip(chunks, shapes, ropes)]
        return self.proj(torch.cat(outs))

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None, num_prefix: int = 1) -> Tensor:
        """x [B, T, D] -> [B, T, D]."""
        batch, tokens, dim = x.shape
        return self.forward_list(x.reshape(batch * tokens, dim), [(batch, tokens)], [rope], num_prefix).view(x.shape)


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(LS1(Attn(LN1 x))), then x + DropPath(LS2(FFN(LN2 x))).

    The unit for FSDP sharding and activation checkpointing. forward also runs several groups of
    sequences (crop sizes) with one call per token-wise layer and one attention call per group.
    """

    def __init__(self, dim: int, num_heads: int, ffn_hidden: int, ffn: str = "mlp", qkv_bias: bool = True,
                 proj_bias: bool = True, ffn_bias: bool = True, drop_path: float = 0.0,
                 layerscale_init: float | None = 1e-5, mask_k_bias: bool = False, norm_eps: float = 1e-6,
                 drop_path_mode: str = "subset"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, mask_k_bias=mask_k_bias)
        self.ls1 = LayerScale(dim, layerscale_init) if layerscale_init is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        if ffn == "mlp":
            self.mlp = Mlp(dim, ffn_hidden, bias=ffn_bias)
        else:
            self.mlp = SwiGLUFFN(dim, ffn_hidden, bias=ffn_bias, layout="w12" if ffn == "swiglu" else "w1w2")
        self.ls2 = LayerScale(dim, layerscale_init) if layerscale_init is not None else nn.Identity()
        if drop_path_mode not in ("subset", "mask"):
            raise ValueError(f"drop_path_mode must be 'subset' or 'mask', got {drop_path_mode!r}")
        self.drop_path, self.drop_path_mode = drop_path, drop_path_mode

    def _drop_path_scale(self, shapes: list[tuple[int, int]], like: Tensor) -> Tensor:
        """Mask mode: per-token factor [sum B_i*T_i, 1]: 0 or 1/(1-p) per sample, repeated over its tokens."""
        keep = 1.0 - self.drop_path
        scales = [like.new_empty(b, 1).bernoulli_(keep).div_(keep).repeat_interleave(t, dim=0) for b, t in shapes]
        return torch.cat(scales)

    def _drop_path_subset(self, shapes: list[tuple[int, int]], device) -> tuple[Tensor, list, Tensor]:
        """Subset mode: for each group of B_i sequences keep a random n_i = max(int(B_i * (1 - p)), 1) of them.

        Returns the token rows of the kept sequences [sum n_i*T_i], their group shapes [(n_i, T_i)], and the
        factor B_i / n_i of each kept row [sum n_i*T_i, 1].
        """
        rows, kept_shapes, scales, offset = [], [], [], 0
        for batch, tokens in shapes:
            kept = max(int(batch * (1.0 - self.drop_path)), 1)
            samples = torch.randperm(batch, device=device)[:kept]
            rows.append((offset + samples[:, None] * tokens + torch.arange(tokens, device=device)).flatten())
            kept_shapes.append((kept, tokens))
            scales.append(torch.full((kept * tokens, 1), batch / kept, device=device))
            offset += batch * tokens
        return torch.cat(rows), kept_shapes, torch.cat(scales)

    def _add_residual(self, x: Tensor, branch, shapes: list[tuple[int, int]]) -> Tensor:
        """x + branch(x) with stochastic depth; branch(tokens, shapes) maps [sum B_i*T_i, D] to the same shape."""
        if self.drop_path == 0.0 or not self.training:
            return x + branch(x, shapes)
        if self.drop_path_mode == "mask":
            out = branch(x, shapes)
            return x + out * self._drop_path_scale(shapes, out)
        # The dropped samples never enter the branch: cheaper than computing and masking it.
        rows, kept_shapes, scales = self._drop_path_subset(shapes, x.device)
        out = branch(x[rows], kept_shapes)
        return x.index_add(0, rows, (out * scales.to(out.dtype)).to(x.dtype))

    def forward(self, x: Tensor, shapes: list[tuple[int, int]] | None = None, ropes: list | None = None,
                num_prefix: int = 1) -> Tensor:
        """x [B, T, D] -> [B, T, D], or, with shapes = [(B_i, T_i), ...], x [sum_i B_i*T_i, D] (groups of B_i
        sequences of T_i tokens, concatenated) -> same shape. ropes: one (sin, cos) or None per group.

        Everything goes through forward (not a side method) so FSDP2 / checkpoint wrappers see every call.
        """
        if shapes is None:
            batch, tokens, dim = x.shape
            return self(x.reshape(batch * tokens, dim), [(batch, tokens)], ropes, num_prefix).view(x.shape)
        ropes = ropes if ropes is not None else [None] * len(shapes)  # RoPE is shared by a group's sequences

        def attention_branch(tokens, group_shapes):
            return self.ls1(self.attn.forward_list(self.norm1(tokens), group_shapes, ropes, num_prefix))

        def ffn_branch(tokens, group_shapes):
            return self.ls2(self.mlp(self.norm2(tokens)))

        x = self._add_residual(x, attention_branch, shapes)
        return self._add_residual(x, ffn_branch, shapes)


# ----------------------------------------------------------------------------- the model

class VisionTransformer(nn.Module):
    """DINOv2 / DINOv3 Vision Transformer backbone.

    Args:
        img_size: image size the learned position table is built for (518 for the DINOv2 hub models).
        patch_size, in_chans, embed_dim, depth, num_heads: the usual.
        ffn_ratio: FFN hidden = embed_dim * ffn_ratio ("mlp"); SwiGLU uses 2/3 of it, rounded up.
        ffn: "mlp" (fc1/fc2), "swiglu" (DINOv2 layout w12/w3, hidden rounded to a multiple of 8) or
            "swiglu64" (DINOv3 layout w1/w2/w3, hidden rounded to a multiple of 64).
        qkv_bias, proj_bias, ffn_bias: biases of the linear layers.
        drop_path_rate: stochastic depth probability, the same for every block (as DINOv2).
        layerscale_init: LayerScale init value; None disables LayerScale.
        num_register_tokens: register (DINOv2) / storage (DINOv3) tokens, no position embedding.
        pos_embed: "learned" (table over CLS + patches) or "rope" (DINOv3 rotary, no table).
        interpolate_offset, interpolate_antialias: how the learned table is resized (see interpolate_pos_embed).
        rope_base, rope_shift_coords, rope_jitter_coords, rope_rescale_coords: see RopePositionEmbedding.
        mask_k_bias: DINOv3 qkv bias mask (buffer attn.qkv.bias_mask).
        untie_global_and_local_cls_norm: DINOv3 7B: a separate LayerNorm (local_cls_norm) for the CLS and
            storage tokens of local crops in training (forward_features_list entries after the first).
        norm_eps: eps of every LayerNorm. None: by layout, 1e-5 for RoPE models (every released DINOv3
            model) and 1e-6 for learned position tables (DINOv2). Loads never carry it: a DINOv3 file in
            1e-6 norms loads strictly yet gives other features.
        drop_path_mode: "subset" (official DINOv2/DINOv3: the residual branch runs on a random
            int(B * (1 - p)) subset of the samples, scaled by B / subset) or "mask" (per-sample
            Bernoulli masks: the same expectation, a random number of dropped samples).
    """

    def __init__(self, img_size: int = 224, patch_size: int = 14, in_chans: int = 3, embed_dim: int = 384,
                 depth: int = 12, num_heads: int = 6, ffn_ratio: float = 4.0, ffn: str = "mlp",
                 qkv_bias: bool = True, proj_bias: bool = True, ffn_bias: bool = True, drop_path_rate: float = 0.0,
                 layerscale_init: float | None = 1e-5, num_register_tokens: int = 0, pos_embed: str = "learned",
                 interpolate_offset: float = 0.1, interpolate_antialias: bool = False, rope_base: float = 100.0,
                 rope_shift_coords: float | None = None, rope_jitter_coords: float | None = None,
                 rope_rescale_coords: float | None = None, mask_k_bias: bool = False,
                 untie_global_and_local_cls_norm: bool = False, norm_eps: float | None = None,
                 drop_path_mode: str = "subset"):
        super().__init__()
        if ffn not in ("mlp", "swiglu", "swiglu64"):
            raise ValueError(f"ffn must be 'mlp', 'swiglu' or 'swiglu64', got {ffn!r}")
        if pos_embed not in ("learned", "rope"):
            raise ValueError(f"pos_embed must be 'learned' or 'rope', got {pos_embed!r}")
        if norm_eps is None:
            norm_eps = 1e-5 if pos_embed == "rope" else 1e-6
        if pos_embed == "learned":
            check_image_size(img_size, img_size, patch_size)  # the table is built for this grid
        self.img_size, self.patch_size, self.embed_dim = img_size, patch_size, embed_dim
        self.num_heads, self.num_register_tokens, self.depth = num_heads, num_register_tokens, depth
        self.interpolate_offset, self.interpolate_antialias = interpolate_offset, interpolate_antialias
        self.num_prefix_tokens = 1 + num_register_tokens
        self.norm_eps = norm_eps

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        grid = img_size // patch_size
        if pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
            self.rope_embed = None
        else:
            self.pos_embed = None
            self.rope_embed = RopePositionEmbedding(embed_dim, num_heads, rope_base, rope_shift_coords,
                                                    rope_jitter_coords, rope_rescale_coords)

        if ffn == "mlp":
            hidden = int(embed_dim * ffn_ratio)
        else:
            hidden = swiglu_hidden_dim(embed_dim, ffn_ratio, align=8 if ffn == "swiglu" else 64)
        self.ffn_hidden = hidden
        make_block = partial(Block, embed_dim, num_heads, hidden, ffn=ffn, qkv_bias=qkv_bias, proj_bias=proj_bias,
                             ffn_bias=ffn_bias, drop_path=drop_path_rate, layerscale_init=layerscale_init,
                             mask_k_bias=mask_k_bias, norm_eps=norm_eps, drop_path_mode=drop_path_mode)
        self.blocks = nn.ModuleList([make_block() for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.local_cls_norm = nn.LayerNorm(embed_dim, eps=norm_eps) if untie_global_and_local_cls_norm else None
        self.init_weights()

    # -- initialisation
    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter and buffer explicitly (also after meta-device build + to_empty()).

        Does nothing on the meta device. Linear layers and the position table: trunc_normal(std 0.02), biases 0. CLS and register
        tokens: normal std 1e-6 (DINOv2) or 0.02 (DINOv3, RoPE models). Mask token 0. Patch
        embedding: PyTorch's Conv2d default. LayerNorm: weight 1, bias 0. LayerScale: init value.
        """
        if self.cls_token.is_meta:
            return  # no storage yet (and meta normal_ would import torch._dynamo): call again after to_empty()
        token_std = 0.02 if self.rope_embed is not None else 1e-6
        nn.init.normal_(self.cls_token, std=token_std)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=token_std)
        nn.init.zeros_(self.mask_token)
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, nn.Conv2d, LayerScale, RopePositionEmbedding)):
                module.reset_parameters()
            elif isinstance(module, Attention):
                module.reset_bias_mask()

    # -- tokens
    def prepare_tokens(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """Image [B,3,H,W] (+ masks bool [B,N]) -> tokens [B, 1+R+N, D] before the first block."""
        batch, _, height, width = x.shape
        x = self.patch_embed(x)  # checks the size
        if masks is not None:
            if masks.shape != x.shape[:2]:
                raise ValueError(f"masks must be [B, N] = {tuple(x.shape[:2])}, got {tuple(masks.shape)}")
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        cls = self.cls_token.expand(batch, -1, -1)
        if self.pos_embed is not None:
            x = torch.cat([cls, x], dim=1)
            pos = interpolate_pos_embed(self.pos_embed, height // self.patch_size, width // self.patch_size,
                                        self.interpolate_offset, self.interpolate_antialias)
            x = x + pos
            if self.register_tokens is not None:
                x = torch.cat([x[:, :1], self.register_tokens.expand(batch, -1, -1), x[:, 1:]], dim=1)
        else:
            prefix = [cls] if self.register_tokens is None else [cls, self.register_tokens.expand(batch, -1, -1)]
            x = torch.cat(prefix + [x], dim=1)
        return x

    def _ropes(self, grids: list[tuple[int, int]]) -> list:
        if self.rope_embed is None:
            return [None] * len(grids)
        return [self.rope_embed(h, w) for h, w in grids]

    def _run_blocks(self, tokens: list[Tensor], grids: list[tuple[int, int]], stop: int | None = None,
                    collect: set[int] = frozenset()) -> tuple[Tensor, list[tuple[int, int]], list[Tensor]]:
        """Run blocks[:stop] on groups of sequences; return flat tokens, group shapes, collected outputs."""
        shapes = [(t.shape[0], t.shape[1]) for t in tokens]
        x = tokens[0].flatten(0, 1) if len(tokens) == 1 else torch.cat([t.flatten(0, 1) for t in tokens])
        ropes = self._ropes(grids)
        collected = []
        for i, block in enumerate(self.blocks[:stop]):
            if i > 0 and self.rope_embed is not None and self.rope_embed.augments:
                ropes = self._ropes(grids)  # as the official student: fresh coordinate augmentation per block
            x = block(x, shapes, ropes, self.num_prefix_tokens)
            if i in collect:
                collected.append(x)
        return x, shapes, collected

    @staticmethod
    def _split(x: Tensor, shapes: list[tuple[int, int]]) -> list[Tensor]:
        return [c.view(b, t, -1) for c, (b, t) in zip(x.split([b * t for b, t in shapes]), shapes)]

    def _output_dict(self, x: Tensor, masks: Tensor | None, local: bool = False) -> dict:
        """x_prenorm [B, 1+R+N, D] -> feature dict."""
        r = self.num_prefix_tokens
        x_norm = self.norm(x)
        prefix = x_norm[:, :r]
        if local and self.local_cls_norm is not None and self.training:
            prefix = self.local_cls_norm(x[:, :r])
        out = {
            "x_norm_clstoken": prefix[:, 0],
            "x_norm_regtokens": prefix[:, 1:],
            "x_norm_patchtokens": x_norm[:, r:],
            "x_prenorm": x,
            "masks": masks,
        }
        if self.rope_embed is not None:  # DINOv3 names its register tokens storage tokens
            out["x_storage_tokens"] = out["x_norm_regtokens"]
        return out

    # -- public API
    def forward_features_list(self, xs: list[Tensor], masks_list: list[Tensor | None] | None = None,
                              pack: bool = True) -> list[dict]:
        """Several crop sizes through the backbone together: one call per token-wise layer per block.

        xs: list of [B_i, 3, H_i, W_i]; masks_list: list of bool [B_i, N_i] or None.
        Inputs of equal size are batched into one attention call. Returns one forward_features dict per input.
        With untie_global_and_local_cls_norm, entries after the first are treated as local crops in training
        (their CLS/storage tokens use local_cls_norm), as in DINOv3 where the call is [globals, locals].
        pack=False: each crop size runs through the blocks on its own (the same features; random drop path and
        RoPE augmentations are drawn in another order). On a CPU that is faster: the matrix products are
        as efficient on either, and packing adds copies (joining and splitting the groups in every block).
        """
        if masks_list is None:
            masks_list = [None] * len(xs)
        if len(masks_list) != len(xs):
            raise ValueError(f"got {len(xs)} inputs but {len(masks_list)} masks")
        groups: dict[tuple[int, int], list[int]] = {}  # image size -> input indices
        for i, x in enumerate(xs):
            check_image_size(x.shape[-2], x.shape[-1], self.patch_size)
            groups.setdefault(tuple(x.shape[-2:]), []).append(i)
        tokens, grids = [], []
        for size, members in groups.items():
            images = torch.cat([xs[i] for i in members]) if len(members) > 1 else xs[members[0]]
            if all(masks_list[i] is None for i in members):
                masks = None
            else:
                masks = torch.cat([self._mask_or_empty(xs[i], masks_list[i]) for i in members])
            tokens.append(self.prepare_tokens(images, masks))
            grids.append((size[0] // self.patch_size, size[1] // self.patch_size))
        if pack:
            x, shapes, _ = self._run_blocks(tokens, grids)
            group_outputs = self._split(x, shapes)
        else:
            group_outputs = []
            for group_tokens, grid in zip(tokens, grids):
                x, shapes, _ = self._run_blocks([group_tokens], [grid])
                group_outputs.append(x.view(*shapes[0], -1))
        outputs: list[dict | None] = [None] * len(xs)
        for group_x, members in zip(group_outputs, groups.values()):
            for i, part in zip(members, group_x.split([xs[i].shape[0] for i in members])):
                outputs[i] = self._output_dict(part, masks_list[i], local=i > 0)
        return outputs

    def _mask_or_empty(self, x: Tensor, masks: Tensor | None) -> Tensor:
        if masks is not None:
            return masks
        n = (x.shape[-2] // self.patch_size) * (x.shape[-1] // self.patch_size)
        return torch.zeros(x.shape[0], n, dtype=torch.bool, device=x.device)

    def forward_features(self, x: Tensor, masks: Tensor | None = None) -> dict:
        """x [B,3,H,W], masks bool [B,N] | None -> dict(x_norm_clstoken [B,D], x_norm_regtokens [B,R,D],
        x_norm_patchtokens [B,N,D], x_prenorm [B,1+R+N,D], masks)."""
        tokens = self.prepare_tokens(x, masks)
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        out, shapes, _ = self._run_blocks([tokens], [grid])
        return self._output_dict(out.view(shapes[0][0], shapes[0][1], -1), masks)

    def forward(self, x: Tensor) -> Tensor:
        """x [B,3,H,W] -> normalised CLS feature [B, D]."""
        return self.forward_features(x)["x_norm_clstoken"]

    def get_intermediate_layers(self, x: Tensor, n: int | list[int] = 1, reshape: bool = False,
                                return_class_token: bool = False, norm: bool = True):
        """Outputs of the last n blocks (n int) or of the blocks with the given indices (n list), like DINOv2.

        Returns a tuple of patch tokens [B, N, D] (or [B, D, h, w] if reshape), or of
        (patch tokens, class token [B, D]) pairs if return_class_token.
        """
        depth = len(self.blocks)
        wanted = set(range(depth - n, depth)) if isinstance(n, int) else set(n)
        if not wanted or min(wanted) < 0 or max(wanted) >= depth:
            raise ValueError(f"block indices must be in [0, {depth}), got {sorted(wanted)}")
        batch, _, height, width = x.shape
        tokens = self.prepare_tokens(x)
        grid = (height // self.patch_size, width // self.patch_size)
        _, shapes, collected = self._run_blocks([tokens], [grid], stop=max(wanted) + 1, collect=wanted)
        outputs = [c.view(batch, shapes[0][1], -1) for c in collected]
        if norm:
            outputs = [self.norm(o) for o in outputs]
        class_tokens = [o[:, 0] for o in outputs]
        outputs = [o[:, self.num_prefix_tokens:] for o in outputs]
        if reshape:
            outputs = [o.reshape(batch, grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous() for o in outputs]
        if return_class_token:
            return tuple(zip(outputs, class_tokens))
        return tuple(outputs)

    def get_last_self_attention(self, x: Tensor) -> Tensor:
        """Attention probabilities of the last block, [B, num_heads, T, T] (fp32, rows sum to 1)."""
        batch = x.shape[0]
        tokens = self.prepare_tokens(x)
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        flat, shapes, _ = self._run_blocks([tokens], [grid], stop=len(self.blocks) - 1)
        last = self.blocks[-1]
        rope = self._ropes([grid])[0]
        qkv = last.attn.qkv_projection(last.norm1(flat))
        return last.attn.attend(qkv, batch, rope, self.num_prefix_tokens, return_attention=True)


# ----------------------------------------------------------------------------- named models

def vit_tiny(**kwargs) -> VisionTransformer:
    """ViT-Ti/14: 192 dim, 12 blocks, 3 heads."""
    return VisionTransformer(**{**dict(patch_size=14, embed_dim=192, depth=12, num_heads=3), **kwargs})


def vit_small(**kwargs) -> VisionTransformer:
    """ViT-S/14: 384 dim, 12 blocks, 6 heads, MLP 4x (22.06 M parameters at img_size 518)."""
    return VisionTransformer(**{**dict(patch_size=14, embed_dim=384, depth=12, num_heads=6), **kwargs})


def vit_base(**kwargs) -> VisionTransformer:
    """ViT-B/14: 768 dim, 12 blocks, 12 heads, MLP 4x."""
    return VisionTransformer(**{**dict(patch_size=14, embed_dim=768, depth=12, num_heads=12), **kwargs})


def vit_large(**kwargs) -> VisionTransformer:
    """ViT-L/14: 1024 dim, 24 blocks, 16 heads, MLP 4x."""
    return VisionTransformer(**{**dict(patch_size=14, embed_dim=1024, depth=24, num_heads=16), **kwargs})


def vit_giant2(**kwargs) -> VisionTransformer:
    """ViT-g/14: 1536 dim, 40 blocks, 24 heads, SwiGLU (w12/w3) hidden 4096."""
    return VisionTransformer(**{**dict(patch_size=14, embed_dim=1536, depth=40, num_heads=24, ffn="swiglu"), **kwargs})


def vit_7b(**kwargs) -> VisionTransformer:
    """DINOv3 ViT-7B/16: 4096 dim, 40 blocks, 32 heads, SwiGLU (w1/w2/w3) hidden 8192, no qkv bias,
    RoPE (rescale 2), 4 storage tokens, untied local CLS norm, LayerNorm eps 1e-5."""
    defaults = dict(patch_size=16, embed_dim=4096, depth=40, num_heads=32, ffn="swiglu64", ffn_ratio=3.0,
                    norm_eps=1e-5, qkv_bias=False, num_register_tokens=4, pos_embed="rope", rope_rescale_coords=2.0,
                    mask_k_bias=True, untie_global_and_local_cls_norm=True)
    return VisionTransformer(**{**defaults, **kwargs})
