"""Tests of dinolite.models against REFERENCE.md facts and hand-computed values."""
import math

import pytest
import torch
import torch.nn.functional as F

from dinolite import models
from dinolite.models import (Block, RopePositionEmbedding, VisionTransformer, drop_path, interpolate_pos_embed,
                             rope_apply, vit_7b, vit_base, vit_giant2, vit_large, vit_small, vit_tiny)


def tiny(**kwargs) -> VisionTransformer:
    """A 2-block ViT-Ti with a 4 x 4 native grid (img_size 56)."""
    torch.manual_seed(0)
    return vit_tiny(**{**dict(depth=2, img_size=56), **kwargs}).eval()


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- sizes

@pytest.mark.parametrize("constructor, kwargs, millions", [
    (vit_small, dict(img_size=518), 22.06),
    (vit_base, dict(img_size=518), 86.58),
    (vit_large, dict(img_size=518), 304.37),
    (vit_giant2, dict(img_size=518), 1136.48),
])
def test_parameter_counts_match_reference(constructor, kwargs, millions):
    with torch.device("meta"):
        model = constructor(**kwargs)
    assert round(count(model) / 1e6, 2) == millions


def test_vit_7b_size_and_layout():
    with torch.device("meta"):
        model = vit_7b()
    assert round(count(model) / 1e6) == 6716
    assert model.patch_size == 16 and model.num_register_tokens == 4 and model.pos_embed is None
    block = model.blocks[0]
    assert block.attn.qkv.bias is None
    assert tuple(block.mlp.w1.weight.shape) == (8192, 4096) and tuple(block.mlp.w3.weight.shape) == (4096, 8192)
    assert tuple(model.rope_embed.periods.shape) == (4096 // 32 // 4,)


def test_giant_swiglu_hidden_is_4096_in_w12_layout():
    with torch.device("meta"):
        model = vit_giant2(depth=1)
    assert tuple(model.blocks[0].mlp.w12.weight.shape) == (2 * 4096, 1536)
    assert tuple(model.blocks[0].mlp.w3.weight.shape) == (1536, 4096)


def test_blocks_are_a_modulelist_of_block():
    model = tiny()
    assert isinstance(model.blocks, torch.nn.ModuleList) and all(isinstance(b, Block) for b in model.blocks)


# ----------------------------------------------------------------------------- position embedding

def test_pos_embed_identity_at_native_grid():
    table = torch.randn(1, 1 + 5 * 5, 8)
    assert interpolate_pos_embed(table, 5, 5) is table
    assert interpolate_pos_embed(table, 5, 5, offset=0.0, antialias=True) is table


def test_pos_embed_offset_mode_equals_official_formula():
    torch.manual_seed(0)
    m, dim, h, w = 5, 3, 7, 4
    table = torch.randn(1, 1 + m * m, dim)
    grid = table[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, scale_factor=((h + 0.1) / m, (w + 0.1) / m), mode="bicubic", antialias=False)
    expected = expected.permute(0, 2, 3, 1).reshape(1, h * w, dim)
    out = interpolate_pos_embed(table, h, w, offset=0.1, antialias=False)
    assert out.shape == (1, 1 + h * w, dim)
    assert torch.equal(out[:, :1], table[:, :1])  # CLS row untouched
    assert torch.allclose(out[:, 1:], expected, atol=1e-6)


def test_pos_embed_two_modes_differ_and_size_mode_equals_formula():
    torch.manual_seed(0)
    table = torch.randn(1, 1 + 6 * 6, 4)
    offset_mode = interpolate_pos_embed(table, 3, 3, offset=0.1, antialias=False)
    size_mode = interpolate_pos_embed(table, 3, 3, offset=0.0, antialias=True)
    assert (offset_mode - size_mode).abs().max() > 1e-2
    grid = table[:, 1:].reshape(1, 6, 6, 4).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(3, 3), mode="bicubic", antialias=True).permute(0, 2, 3, 1).reshape(1, 9, 4)
    assert torch.allclose(size_mode[:, 1:], expected, atol=1e-6)


def test_pos_embed_non_square_keeps_row_and_column_orientation():
    # channel 0 = row index, channel 1 = column index of a 6 x 6 grid; bicubic keeps linear ramps
    m = 6
    rows, cols = torch.meshgrid(torch.arange(m, dtype=torch.float32), torch.arange(m, dtype=torch.float32), indexing="ij")
    table = torch.cat([torch.zeros(1, 1, 2), torch.stack([rows, cols], -1).reshape(1, m * m, 2)], dim=1)
    out = interpolate_pos_embed(table, 3, 8, offset=0.0, antialias=False)[0, 1:].reshape(3, 8, 2)
    assert torch.allclose(out[..., 0], out[:, :1, 0].expand(3, 8), atol=1e-5)  # row channel constant along rows
    assert torch.allclose(out[..., 1], out[:1, :, 1].expand(3, 8), atol=1e-5)  # column channel constant down columns
    assert (out[1:, 0, 0] > out[:-1, 0, 0]).all() and (out[0, 1:, 1] > out[0, :-1, 1]).all()


def test_pos_embed_is_computed_in_fp32_and_returned_in_table_dtype():
    torch.manual_seed(0)
    table = torch.randn(1, 1 + 4 * 4, 8)
    out16 = interpolate_pos_embed(table.bfloat16(), 6, 5)
    expected = interpolate_pos_embed(table.bfloat16().float(), 6, 5).bfloat16()
    assert out16.dtype == torch.bfloat16 and torch.equal(out16, expected)


def test_prepare_tokens_order_registers_get_no_position_embedding():
    model = tiny(num_register_tokens=4, interpolate_offset=0.0, interpolate_antialias=True)
    x = torch.randn(2, 3, 42, 70)  # 3 x 5 grid, native 4 x 4
    tokens = model.prepare_tokens(x)
    assert tokens.shape == (2, 1 + 4 + 15, 192)
    pos = interpolate_pos_embed(model.pos_embed, 3, 5, offset=0.0, antialias=True)
    assert torch.allclose(tokens[:, 0], (model.cls_token + pos[:, :1])[:, 0].expand(2, -1))
    assert torch.equal(tokens[:, 1:5], model.register_tokens.expand(2, -1, -1))
    assert torch.allclose(tokens[:, 5:], model.patch_embed(x) + pos[:, 1:], atol=1e-6)


# ----------------------------------------------------------------------------- mask token

def test_mask_token_replaces_masked_patches_before_pos_embed():
    model = tiny()
    with torch.no_grad():
        model.mask_token.normal_()
    x = torch.randn(1, 3, 56, 56)
    masks = torch.zeros(1, 16, dtype=torch.bool)
    masks[0, 5] = True  # patch row 1, column 1 = pixels [14:28, 14:28]
    y = x.clone()
    y[..., 14:28, 14:28] = torch.randn(3, 14, 14) * 10
    out_x = model.forward_features(x, masks)
    out_y = model.forward_features(y, masks)
    assert torch.allclose(out_x["x_prenorm"], out_y["x_prenorm"], atol=1e-6)  # pixels under the mask do not matter
    assert not torch.allclose(model.forward_features(x)["x_prenorm"], model.forward_features(y)["x_prenorm"])
    tokens = model.prepare_tokens(x, masks)
    assert torch.allclose(tokens[0, 1 + 5], model.mask_token[0] + model.pos_embed[0, 1 + 5])
    with torch.no_grad():
        model.mask_token.add_(1.0)
    assert not torch.allclose(model.forward_features(x, masks)["x_prenorm"], out_x["x_prenorm"])
    assert out_x["masks"] is masks


# ----------------------------------------------------------------------------- LayerScale, drop path

def test_layerscale_init_values():
    assert torch.equal(tiny().blocks[0].ls1.gamma, torch.full((192,), 1e-5))
    assert torch.equal(tiny(layerscale_init=1.0).blocks[1].ls2.gamma, torch.ones(192))
    assert not any("gamma" in name for name, _ in tiny(layerscale_init=None).named_parameters())


def test_drop_path_identity_in_eval_and_rescales_survivors_in_train():
    x = torch.ones(4000, 3, 5)
    assert drop_path(x, 0.3, training=False) is x
    torch.manual_seed(0)
    y = drop_path(x, 0.25, training=True)
    per_sample = y.flatten(1)
    assert torch.equal(per_sample.min(1).values, per_sample.max(1).values)  # whole samples kept or dropped
    values = per_sample[:, 0].unique()
    assert len(values) == 2 and values[0] == 0 and values[1].item() == pytest.approx(1 / 0.75)
    assert abs((per_sample[:, 0] > 0).float().mean().item() - 0.75) < 0.03


def test_block_drop_path_mask_mode_is_per_sample_and_off_in_eval():
    torch.manual_seed(0)
    block = Block(16, 2, 32, drop_path=0.5, layerscale_init=1.0, drop_path_mode="mask")
    x = torch.randn(64, 5, 16)
    block.eval()
    assert torch.equal(block(x), block(x))
    block.train()
    torch.manual_seed(1)
    delta = block(x) - x
    dropped = delta.flatten(1).abs().max(1).values == 0
    assert 10 < dropped.sum() < 54  # both outcomes happen, whole samples at a time
    scale = block._drop_path_scale([(3, 4), (2, 5)], x)
    assert scale.shape == (3 * 4 + 2 * 5, 1)
    assert set(scale.flatten().tolist()) <= {0.0, 2.0}
    assert all(len(set(chunk.flatten().tolist())) == 1 for chunk in scale.split([4, 4, 4, 5, 5]))


def test_block_drop_path_subset_mode_exact_size_and_scale():
    # Official rule (REFERENCE.md): per group of B sequences, a random int(B * (1 - p)) of them (at least 1)
    # run the branch, scaled by B / subset; the others pass unchanged.
    block = Block(8, 2, 16, drop_path=0.3)
    assert block.drop_path_mode == "subset"
    block.train()
    x = torch.randn(10 * 3 + 4 * 2, 8)  # group 1: 10 sequences of 3 tokens; group 2: 4 sequences of 2 tokens
    shapes = [(10, 3), (4, 2)]

    def branch(tokens, group_shapes):
        return 2 * tokens + 1  # token-wise, so every kept sequence's result is known

    for _ in range(20):
        out = block._add_residual(x, branch, shapes)
        changed = (out - x).abs().amax(dim=1) > 0
        for (start, batch, tokens), kept in (((0, 10, 3), 7), ((30, 4, 2), 2)):  # int(10 * 0.7), int(4 * 0.7)
            per_sequence = changed[start:start + batch * tokens].view(batch, tokens)
            assert torch.equal(per_sequence.all(1), per_sequence.any(1))  # whole sequences
            assert per_sequence.all(1).sum() == kept
            rows = slice(start, start + batch * tokens)
            mask = changed[rows, None]
            expected = torch.where(mask, x[rows] + batch / kept * branch(x[rows], None), x[rows])
            torch.testing.assert_close(out[rows], expected)


def test_block_drop_path_subset_mode_expectation():
    # E[output] = x + branch(x): each sequence is kept with probability n / B and then scaled by B / n.
    block = Block(4, 1, 8, drop_path=0.4)
    block.train()
    x = torch.zeros(5 * 2, 4)
    draws = 4000
    total = sum(block._add_residual(x, lambda t, s: t + 1, [(5, 2)]) for _ in range(draws))
    # Each entry averages draws of (5/3) * Bernoulli(3/5): std of the mean = (5/3) sqrt(0.6 * 0.4 / draws) = 0.013.
    assert (total / draws - 1).abs().max() < 5 * 0.013


def test_block_subset_mode_full_block_runs_each_branch_on_whole_samples():
    torch.manual_seed(0)
    block = Block(16, 2, 32, drop_path=0.5, layerscale_init=1.0)
    x = torch.randn(4, 5, 16)
    attention = lambda t: block.ls1(block.attn(block.norm1(t)))  # noqa: E731
    ffn = lambda t: block.ls2(block.mlp(block.norm2(t)))  # noqa: E731
    block.train()
    out = block(x)
    kept_attention = kept_ffn = 0
    for i in range(4):
        sample = x[i:i + 1]
        matches = []
        for attn_kept in (False, True):
            a = sample + 2 * attention(sample) if attn_kept else sample  # scale B / n = 4 / 2
            for ffn_kept in (False, True):
                candidate = a + 2 * ffn(a) if ffn_kept else a
                if torch.allclose(out[i:i + 1], candidate, atol=1e-5):
                    matches.append((attn_kept, ffn_kept))
        assert len(matches) == 1
        kept_attention += matches[0][0]
        kept_ffn += matches[0][1]
    assert kept_attention == 2 and kept_ffn == 2


def test_bad_drop_path_mode():
    with pytest.raises(ValueError, match="drop_path_mode"):
        Block(8, 2, 16, drop_path_mode="bernoulli")


# ----------------------------------------------------------------------------- RoPE

def test_rope_periods_hand_computed():
    rope = RopePositionEmbedding(embed_dim=32, num_heads=2)  # head dim 16 -> 4 periods
    assert torch.allclose(rope.periods, torch.tensor([1.0, 100 ** 0.25, 10.0, 100 ** 0.75]))
    rope8 = RopePositionEmbedding(embed_dim=8, num_heads=1)  # head dim 8 -> periods 1, 10
    assert torch.allclose(rope8.periods, torch.tensor([1.0, 10.0]))
    sin, cos = rope8.eval()(2, 2)
    # token 1 = row 0, column 1 -> coords (-0.5, +0.5); angles 2*pi*c/period, [row, row, col, col] twice
    angles = 2 * math.pi * torch.tensor([-0.5 / 1, -0.5 / 10, 0.5 / 1, 0.5 / 10])
    assert torch.allclose(sin[1], angles.sin().repeat(2), atol=1e-6)
    assert torch.allclose(cos[1], angles.cos().repeat(2), atol=1e-6)


def test_rope_coordinates_are_patch_centres():
    rope = RopePositionEmbedding(embed_dim=8, num_heads=1).eval()
    coords = rope.coords(2, 4)
    assert torch.allclose(coords[:4, 0], torch.full((4,), -0.5))
    assert torch.allclose(coords[:4, 1], torch.tensor([-0.75, -0.25, 0.25, 0.75]))


def test_rope_preserves_norm_and_depends_only_on_relative_position():
    torch.manual_seed(0)
    rope = RopePositionEmbedding(embed_dim=16, num_heads=1).eval()
    sin, cos = rope(4, 4)  # 16 positions, row-major
    q, k = torch.randn(16), torch.randn(16)
    q_rot = rope_apply(q.expand(16, 16), sin, cos)
    k_rot = rope_apply(k.expand(16, 16), sin, cos)
    assert torch.allclose(q_rot.norm(dim=-1), q.norm().expand(16), atol=1e-5)
    dots = q_rot @ k_rot.T  # dots[i, j] = <R_i q, R_j k>

    def pos(r, c):
        return 4 * r + c

    same_offset = [dots[pos(0, 0), pos(1, 2)], dots[pos(1, 1), pos(2, 3)], dots[pos(2, 0), pos(3, 2)]]
    assert torch.allclose(torch.stack(same_offset), same_offset[0].expand(3), atol=1e-5)
    assert not torch.allclose(dots[pos(0, 0), pos(1, 2)], dots[pos(0, 0), pos(2, 1)], atol=1e-3)


def test_rope_training_augmentation_rescales_coordinates():
    rope = RopePositionEmbedding(embed_dim=16, num_heads=1, rescale_coords=2.0)
    base = rope.eval().coords(4, 6)
    rope.train()
    torch.manual_seed(0)
    factors = []
    for _ in range(20):
        ratio = rope.coords(4, 6) / base
        assert torch.allclose(ratio, ratio[0, 0].expand_as(ratio), atol=1e-5)  # one shared factor
        factors.append(ratio[0, 0].item())
    assert 0.5 <= min(factors) < max(factors) <= 2.0
    jitter = RopePositionEmbedding(embed_dim=16, num_heads=1, jitter_coords=1.5, shift_coords=0.1).train()
    assert not torch.allclose(jitter.coords(4, 6), base)


def test_rope_model_rotates_patch_tokens_only():
    model = tiny(pos_embed="rope", num_register_tokens=2, depth=1)
    assert model.pos_embed is None and model.rope_embed is not None
    x = torch.randn(1, 3, 56, 56)
    attn = model.get_last_self_attention(x)
    # recompute with q/k of the prefix rotated too: prefix rows must change only then
    block = model.blocks[0]
    tokens = model.prepare_tokens(x)
    q, k, _ = block.attn.qkv(block.norm1(tokens)).view(1, 19, 3, 3, 64).permute(2, 0, 3, 1, 4)
    sin, cos = model.rope_embed(4, 4)
    q = torch.cat([q[:, :, :3], rope_apply(q[:, :, 3:], sin, cos)], dim=2)
    k = torch.cat([k[:, :, :3], rope_apply(k[:, :, 3:], sin, cos)], dim=2)
    expected = torch.softmax(q @ k.transpose(-2, -1) / 8.0, dim=-1)
    assert torch.allclose(attn, expected, atol=1e-5)


# ----------------------------------------------------------------------------- forward paths

@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(num_register_tokens=4, interpolate_offset=0.0, interpolate_antialias=True, ffn="swiglu"),
    dict(pos_embed="rope", num_register_tokens=4, ffn="swiglu64", mask_k_bias=True, rope_rescale_coords=2.0),
])
@pytest.mark.parametrize("pack", [True, False])
def test_forward_features_list_equals_separate_calls(kwargs, pack):
    model = tiny(**kwargs)
    torch.manual_seed(1)
    globals_, locals_, more_globals = torch.randn(2, 3, 56, 56), torch.randn(3, 3, 28, 28), torch.randn(1, 3, 56, 56)
    masks = torch.rand(2, 16) < 0.4
    outs = model.forward_features_list([globals_, locals_, more_globals], [masks, None, None], pack=pack)
    refs = [model.forward_features(globals_, masks), model.forward_features(locals_),
            model.forward_features(more_globals)]
    for out, ref in zip(outs, refs):
        for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
            assert out[key].shape == ref[key].shape
            assert torch.allclose(out[key], ref[key], atol=1e-5), key
        assert out["masks"] is ref["masks"]


def test_forward_features_keys_and_shapes():
    model = tiny(num_register_tokens=4)
    out = model.forward_features(torch.randn(2, 3, 42, 56))  # 3 x 4 grid
    assert out["x_norm_clstoken"].shape == (2, 192)
    assert out["x_norm_regtokens"].shape == (2, 4, 192)
    assert out["x_norm_patchtokens"].shape == (2, 12, 192)
    assert out["x_prenorm"].shape == (2, 17, 192)
    assert torch.allclose(model.norm(out["x_prenorm"])[:, 0], out["x_norm_clstoken"])
    assert torch.equal(model(torch.ones(1, 3, 56, 56)), model.forward_features(torch.ones(1, 3, 56, 56))["x_norm_clstoken"])


def test_get_intermediate_layers():
    model = tiny(depth=3)
    x = torch.randn(2, 3, 42, 56)
    last = model.get_intermediate_layers(x, 1, return_class_token=True)
    out = model.forward_features(x)
    assert torch.allclose(last[0][0], out["x_norm_patchtokens"], atol=1e-6)
    assert torch.allclose(last[0][1], out["x_norm_clstoken"], atol=1e-6)
    maps = model.get_intermediate_layers(x, [0, 2], reshape=True, norm=False)
    assert len(maps) == 2 and maps[1].shape == (2, 192, 3, 4)
    assert torch.allclose(maps[1].flatten(2).transpose(1, 2), out["x_prenorm"][:, 1:], atol=1e-6)
    with pytest.raises(ValueError, match="block indices"):
        model.get_intermediate_layers(x, [5])


def test_attention_probabilities_rows_sum_to_one_and_reproduce_the_block():
    model = tiny(num_register_tokens=2)
    x = torch.randn(2, 3, 56, 56)
    attn = model.get_last_self_attention(x)
    assert attn.shape == (2, 3, 1 + 2 + 16, 1 + 2 + 16)
    assert torch.allclose(attn.sum(-1), torch.ones(2, 3, 19), atol=1e-5)
    # slow reference: explicit softmax(q k^T / sqrt(d)) v through the last block equals the SDPA forward
    tokens = model.blocks[0](model.prepare_tokens(x))
    last = model.blocks[1]
    v = last.attn.qkv(last.norm1(tokens)).view(2, 19, 3, 3, 64)[:, :, 2].transpose(1, 2)
    mixed = (attn @ v).transpose(1, 2).reshape(2, 19, 192)
    y = tokens + last.ls1(last.attn.proj(mixed))
    y = y + last.ls2(last.mlp(last.norm2(y)))
    assert torch.allclose(y, model.forward_features(x)["x_prenorm"], atol=1e-5)


def test_image_size_error_message():
    model = tiny()
    with pytest.raises(ValueError) as err:
        model(torch.randn(1, 3, 225, 224))
    assert str(err.value) == ("image size 225x224 is not a multiple of the patch size 14; "
                              "use 224 or 238 for the height (resize or crop)")
    with pytest.raises(ValueError, match=r"image size 100x100 .* patch size 14; use 98 or 112 \(resize or crop\)"):
        model(torch.randn(1, 3, 100, 100))
    with pytest.raises(ValueError, match="use 14 for the width"):
        model.forward_features_list([torch.randn(1, 3, 28, 10)])


def test_bf16_autocast_on_cpu_is_close_to_fp32():
    model = tiny()
    x = torch.randn(2, 3, 56, 56)
    ref = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert F.cosine_similarity(out.float(), ref).min() > 0.99


def test_meta_build_to_empty_init_weights_gives_finite_outputs():
    with torch.device("meta"):
        model = vit_tiny(depth=2, img_size=56, num_register_tokens=4, pos_embed="rope", mask_k_bias=True)
    model.to_empty(device="cpu")
    model.init_weights()
    model.eval()
    assert torch.allclose(model.rope_embed.periods, 100 ** (2 * torch.arange(16) / 32))  # buffer re-initialised
    mask = model.blocks[0].attn.qkv.bias_mask
    assert mask[:192].eq(1).all() and mask[192:384].eq(0).all() and mask[384:].eq(1).all()
    assert torch.isfinite(model(torch.randn(2, 3, 56, 56))).all()
    learned = vit_tiny(depth=1, img_size=56)
    assert learned.cls_token.abs().max() < 1e-4 and abs(learned.pos_embed.std().item() - 0.02) < 0.003
    assert abs(learned.blocks[0].mlp.fc1.weight.std().item() - 0.02) < 0.002
    assert learned.blocks[0].mlp.fc1.bias.abs().max() == 0 and learned.mask_token.abs().max() == 0


def test_mask_k_bias_zeroes_the_key_bias():
    torch.manual_seed(0)
    attn = models.Attention(8, 2, qkv_bias=True, mask_k_bias=True)
    with torch.no_grad():
        attn.qkv.bias.normal_()
    x = torch.randn(3, 8)
    expected = x @ attn.qkv.weight.T + torch.cat([attn.qkv.bias[:8], torch.zeros(8), attn.qkv.bias[16:]])
    assert torch.allclose(attn.qkv_projection(x), expected, atol=1e-6)


def test_bad_options_raise():
    with pytest.raises(ValueError, match="ffn must be"):
        vit_tiny(ffn="gelu")
    with pytest.raises(ValueError, match="masks must be"):
        tiny().forward_features(torch.randn(1, 3, 56, 56), torch.zeros(1, 15, dtype=torch.bool))


def test_untied_local_cls_norm_applies_to_local_crops_in_training():
    model = tiny(pos_embed="rope", num_register_tokens=4, untie_global_and_local_cls_norm=True).train()
    with torch.no_grad():
        model.local_cls_norm.weight.fill_(2.0)
    glob, loc = model.forward_features_list([torch.randn(2, 3, 56, 56), torch.randn(3, 3, 28, 28)])
    assert torch.allclose(glob["x_norm_clstoken"], model.norm(glob["x_prenorm"][:, 0]), atol=1e-6)
    assert torch.allclose(loc["x_norm_clstoken"], model.local_cls_norm(loc["x_prenorm"][:, 0]), atol=1e-6)
    assert torch.allclose(loc["x_norm_regtokens"], model.local_cls_norm(loc["x_prenorm"][:, 1:5]), atol=1e-6)
    assert torch.allclose(loc["x_norm_patchtokens"], model.norm(loc["x_prenorm"][:, 5:]), atol=1e-6)
    model.eval()
    loc_eval = model.forward_features_list([torch.randn(1, 3, 56, 56), torch.randn(3, 3, 28, 28)])[1]
    assert torch.allclose(loc_eval["x_norm_clstoken"], model.norm(loc_eval["x_prenorm"][:, 0]), atol=1e-6)


def test_every_block_call_goes_through_module_call_for_fsdp_hooks():
    model = tiny(depth=3)
    calls = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda module, args: calls.append(module))
    model.forward_features_list([torch.randn(1, 3, 56, 56), torch.randn(2, 3, 28, 28)])
    assert calls == list(model.blocks)  # one call per block for all crops together
    calls.clear()
    model.get_intermediate_layers(torch.randn(1, 3, 56, 56), n=[1])
    assert calls == list(model.blocks[:2])
