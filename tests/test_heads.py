import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dinolite.heads import HEAD_SIZES, DINOHead, WeightNormLinear, num_parameters


def small_head(**kwargs):
    torch.manual_seed(0)
    return DINOHead(in_dim=16, out_dim=50, hidden_dim=32, bottleneck_dim=8, **kwargs)


def test_forward_equals_written_out_computation():
    head = small_head()
    x = torch.randn(3, 5, 16)
    out = head(x)
    assert out.shape == (3, 5, 50)
    lin = [m for m in head.mlp if isinstance(m, nn.Linear)]
    h = F.gelu(lin[0](x))
    h = F.gelu(lin[1](h))
    h = lin[2](h)
    h = h / h.norm(dim=-1, keepdim=True)
    v, g = head.last_layer.weight_v, head.last_layer.weight_g
    expected = h @ (g * v / v.norm(dim=1, keepdim=True)).t()
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


def test_official_state_dict_layout():
    head = small_head()
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes == {
        "mlp.0.weight": (32, 16), "mlp.0.bias": (32,),
        "mlp.2.weight": (32, 32), "mlp.2.bias": (32,),
        "mlp.4.weight": (8, 32), "mlp.4.bias": (8,),
        "last_layer.weight_g": (50, 1), "last_layer.weight_v": (50, 8),
    }


@pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")
def test_weight_norm_matches_torch_weight_norm():
    torch.manual_seed(1)
    ours = WeightNormLinear(8, 6)
    with torch.no_grad():
        ours.weight_g.copy_(torch.rand(6, 1) + 0.5)
    reference = nn.Linear(8, 6, bias=False)
    reference = nn.utils.weight_norm(reference)  # the layout the official checkpoints use
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(4, 8)
    torch.testing.assert_close(ours(x), reference(x))


def test_weight_g_starts_at_one_and_is_trainable():
    head = small_head()
    g = head.last_layer.weight_g
    assert torch.equal(g, torch.ones(50, 1)) and g.requires_grad
    head(torch.randn(4, 16)).square().sum().backward()
    assert g.grad is not None and g.grad.abs().sum() > 0


def test_logits_are_cosines_times_g():
    # The prototype layer sees unit vectors, so with g = 1 every logit is a cosine in [-1, 1] ...
    head = small_head()
    x = 100 * torch.randn(64, 16)
    out = head(x)
    assert out.abs().max() <= 1 + 1e-6
    # ... and scaling g_k scales logit k and nothing else.
    with torch.no_grad():
        head.last_layer.weight_g[3] = 2.5
    out2 = head(x)
    torch.testing.assert_close(out2[:, 3], 2.5 * out[:, 3])
    torch.testing.assert_close(out2[:, :3], out[:, :3])


def test_invariant_to_scale_of_bottleneck():
    # Scaling the last MLP layer (weight and bias) by c > 0 scales the bottleneck vector by c,
    # which the L2 normalisation removes.
    head = small_head()
    x = torch.randn(7, 16)
    out = head(x)
    with torch.no_grad():
        head.mlp[4].weight.mul_(3.7)
        head.mlp[4].bias.mul_(3.7)
    torch.testing.assert_close(head(x), out, atol=1e-6, rtol=1e-5)


def test_zero_bottleneck_gives_zero_logits_not_nan():
    head = small_head()
    with torch.no_grad():
        head.mlp[4].weight.zero_()
        head.mlp[4].bias.zero_()
    out = head(torch.randn(2, 16))
    assert torch.equal(out, torch.zeros(2, 50))


def test_init_weights():
    head = DINOHead(64, out_dim=4096, hidden_dim=512, bottleneck_dim=128)
    for m in head.mlp:
        if isinstance(m, nn.Linear):
            assert torch.equal(m.bias, torch.zeros_like(m.bias))
            assert abs(m.weight.std().item() - 0.02) < 0.002
            assert abs(m.weight.mean().item()) < 0.002
    with torch.no_grad():
        head.last_layer.weight_g.fill_(3.0)
        head.mlp[0].bias.fill_(1.0)
    head.init_weights()
    assert torch.equal(head.last_layer.weight_g, torch.ones(4096, 1))
    assert torch.equal(head.mlp[0].bias, torch.zeros(512))


def test_dinov3_plain_last_layer():
    head = small_head(weight_norm_last_layer=False)
    assert type(head.last_layer) is nn.Linear and head.last_layer.bias is None
    assert set(head.state_dict()) >= {"last_layer.weight"}
    x = torch.randn(3, 16)
    h = F.normalize(head.mlp(x), dim=-1)
    torch.testing.assert_close(head(x), h @ head.last_layer.weight.t())
    assert abs(head.last_layer.weight.std().item() - 0.02) < 0.003


def test_one_layer_mlp():
    head = DINOHead(16, out_dim=10, hidden_dim=999, bottleneck_dim=8, n_layers=1)
    # The official one-layer head is a bare Linear: keys mlp.weight / mlp.bias (not mlp.0.*).
    assert sorted(head.state_dict()) == ["last_layer.weight_g", "last_layer.weight_v", "mlp.bias", "mlp.weight"]
    assert head.mlp.weight.shape == (8, 16)
    x = torch.randn(3, 16)
    expected = F.linear(F.normalize(head.mlp(x), dim=-1), head.last_layer.weight)
    torch.testing.assert_close(head(x), expected)


def test_official_sizes_parameter_counts():
    with torch.device("meta"):
        v2 = DINOHead(384, **HEAD_SIZES["dinov2"])
        v3 = DINOHead(4096, **HEAD_SIZES["dinov3_7b_dino"])
    mlp_v2 = 384 * 2048 + 2048 + 2048 * 2048 + 2048 + 2048 * 256 + 256
    assert num_parameters(v2) == mlp_v2 + 65536 + 65536 * 256  # weight_g + weight_v
    mlp_v3 = 4096 * 8192 + 8192 + 8192 * 8192 + 8192 + 8192 * 512 + 512
    assert num_parameters(v3) == mlp_v3 + 262144 * 512
    assert HEAD_SIZES["dinov2_large"]["out_dim"] == 131072 and HEAD_SIZES["dinov2_large"]["bottleneck_dim"] == 384
    assert (HEAD_SIZES["dinov3_7b_ibot"]["out_dim"], HEAD_SIZES["dinov3_7b_ibot"]["hidden_dim"],
            HEAD_SIZES["dinov3_7b_ibot"]["bottleneck_dim"]) == (98304, 4096, 384)


def test_bad_input():
    head = small_head()
    with pytest.raises(ValueError, match=r"\[\.\.\., 16\]"):
        head(torch.randn(2, 15))
    with pytest.raises(ValueError, match="n_layers"):
        DINOHead(16, n_layers=0)
