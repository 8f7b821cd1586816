import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from dinolite.models import vit_tiny  # noqa: E402
from dinolite.viz import (  # noqa: E402
    MIN_FONT_SIZE,
    PAGE_WIDTH,
    check_figure,
    cls_attention_maps,
    high_norm_tokens,
    patch_token_norms,
    pca_fit,
    pca_foreground,
    pca_rgb,
    plot_attention_maps,
    plot_image_grid,
    plot_norm_histograms,
    plot_pca,
    plot_retrieval,
    upsample_maps,
    use_book_style,
)


def planted_scene(n=3, h=8, w=8, D=16, seed=0, box=(2, 6, 2, 6)):
    """Patch tokens: background code + noise, a foreground code inside `box` (rows r0:r1, cols c0:c1)."""
    g = torch.Generator().manual_seed(seed)
    background, foreground = torch.randn(D, generator=g), torch.randn(D, generator=g) * 2
    tokens = background + 0.1 * torch.randn(n, h, w, D, generator=g)
    mask = torch.zeros(n, h, w, dtype=torch.bool)
    r0, r1, c0, c1 = box
    mask[:, r0:r1, c0:c1] = True
    tokens[mask] = foreground + 0.1 * torch.randn(int(mask.sum()), D, generator=g)
    return tokens, mask


def test_pca_fit_matches_covariance_eigenvectors():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g) @ torch.randn(5, 5, generator=g)
    mean, components = pca_fit(x, 3)
    cov = np.cov(x.numpy(), rowvar=False)
    eigenvalues, eigenvectors = np.linalg.eigh(cov)
    expected = torch.from_numpy(eigenvectors[:, ::-1][:, :3].T.copy()).float()
    signs = torch.sign((components * expected).sum(1, keepdim=True))
    torch.testing.assert_close(components, expected * signs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mean, x.mean(0))


def test_pca_rgb_shape_range_and_joint_fit():
    tokens, _ = planted_scene()
    rgb = pca_rgb(tokens)
    assert rgb.shape == (3, 8, 8, 3)
    assert rgb.min() == 0.0 and rgb.max() == 1.0
    # scaled jointly: each channel spans exactly [0, 1] over all images together
    flat = rgb.reshape(-1, 3)
    torch.testing.assert_close(flat.min(0).values, torch.zeros(3))
    torch.testing.assert_close(flat.max(0).values, torch.ones(3))
    # the same token in two different images gets the same colour (one PCA for all images)
    tokens[2, 0, 0] = tokens[0, 7, 7]
    rgb = pca_rgb(tokens)
    torch.testing.assert_close(rgb[2, 0, 0], rgb[0, 7, 7])
    # lists with different grids come back as lists with the same grids
    out = pca_rgb([tokens[0], tokens[1, :4, :6]], n_components=2)
    assert [tuple(o.shape) for o in out] == [(8, 8, 3), (4, 6, 3)]
    assert (out[0][..., 2] == 0).all()  # unused third channel
    with pytest.raises(ValueError, match="patch tokens only"):
        pca_rgb(tokens.reshape(3, 64, 16))


@pytest.mark.parametrize("box", [(2, 6, 2, 6), (1, 8, 1, 8)])  # small and large (> half) foreground
def test_first_component_separates_foreground(box):
    tokens, mask = planted_scene(box=box)
    assert torch.equal(pca_foreground(tokens, threshold=0.5), mask)
    rgb = pca_rgb(tokens, foreground_threshold=0.5)
    assert (rgb[~mask] == 0).all()  # background is black
    assert rgb[mask].max() == 1.0


def tiny_model(**kwargs):
    torch.manual_seed(0)
    return vit_tiny(img_size=32, patch_size=8, depth=2, **kwargs).eval()


@pytest.mark.parametrize("registers", [0, 4])
def test_cls_attention_maps(registers):
    model = tiny_model(num_register_tokens=registers)
    images = torch.randn(2, 3, 32, 48)
    attention = model.get_last_self_attention(images)
    T = 1 + registers + 4 * 6
    assert attention.shape == (2, 3, T, T)
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, 3, T))
    maps = cls_attention_maps(model, images)
    assert maps.shape == (2, 3, 4, 6)
    torch.testing.assert_close(maps.flatten(2), attention[:, :, 0, 1 + registers :])
    # what is missing from the patch maps is the attention to [CLS] and registers
    torch.testing.assert_close(maps.sum((-2, -1)) + attention[:, :, 0, : 1 + registers].sum(-1), torch.ones(2, 3))
    up = upsample_maps(maps, (32, 48))
    assert up.shape == (2, 3, 32, 48)
    torch.testing.assert_close(up.mean((-2, -1)), maps.mean((-2, -1)), atol=0.1 * maps.mean().item(), rtol=0)


def test_high_norm_detector_finds_planted_outliers():
    g = torch.Generator().manual_seed(0)
    norms = 10 + torch.randn(4, 16, 16, generator=g)
    planted = torch.zeros_like(norms, dtype=torch.bool)
    planted.view(-1)[torch.randperm(norms.numel(), generator=g)[:20]] = True
    norms[planted] = 60 + 10 * torch.rand(20, generator=g)
    assert torch.equal(high_norm_tokens(norms), planted)
    # the median-based threshold ignores the outliers: ~2 x 10, not pulled towards them
    from dinolite.viz import high_norm_threshold

    assert high_norm_threshold(norms) == pytest.approx(20.0, abs=0.5)
    assert not high_norm_tokens(10 + torch.randn(1000, generator=g)).any()  # no outliers, no flags


def test_patch_token_norms_read_prenorm_patch_tokens():
    model = tiny_model(num_register_tokens=4)
    images = torch.randn(2, 3, 32, 32)
    out = model.forward_features(images)
    norms = patch_token_norms(model, images)
    torch.testing.assert_close(norms.flatten(1), out["x_prenorm"][:, 5:].norm(dim=-1))
    torch.testing.assert_close(patch_token_norms(model, images, prenorm=False).flatten(1), out["x_norm_patchtokens"].norm(dim=-1))


def test_plot_helpers_return_figures():
    images = [torch.rand(3, 32, 32) for _ in range(4)]
    masks = [torch.randint(0, 3, (32, 32)) for _ in range(4)]
    fig = plot_image_grid(images, titles=list("abcd"), masks=masks, ncols=2)
    assert isinstance(fig, plt.Figure) and len(fig.axes) >= 4
    tokens, _ = planted_scene(n=4, h=4, w=4)
    fig2 = plot_pca(images, pca_rgb(tokens))
    assert len(fig2.axes) == 8
    fig3 = plot_attention_maps(images[0], torch.rand(3, 4, 4))
    assert len(fig3.axes) == 5  # image, 3 heads, one colour bar for the shared scale
    weak = torch.full((3, 4, 4), 1 / 16)  # uniform attention, drawn on its own scale and on a shared one
    own, shared = plot_attention_maps(images[0], weak), plot_attention_maps(images[0], weak, vmax=0.5)
    assert own.axes[1].images[1].get_clim() == pytest.approx((0, 1 / 16))
    assert shared.axes[1].images[1].get_clim() == (0, 0.5) and shared.axes[-1].get_ylim() == (0, 0.5)
    plt.close(own), plt.close(shared)
    fig4 = plot_norm_histograms({"a": torch.rand(100), "b": torch.rand(100) + 1})
    assert len(fig4.axes) == 2 and "high-norm" in fig4.axes[0].get_title()
    dataset = [(image, label) for image, label in zip(images, [0, 0, 1, 1])]  # items of a labelled dataset
    fig5 = plot_retrieval(images[:2], dataset, torch.tensor([[1, 2, 3], [0, 2, 3]]), scores=torch.rand(2, 3),
                          query_labels=[0, 1], database_labels=[0, 0, 1, 1])
    assert len(fig5.axes) == 8
    for f in (fig, fig2, fig3, fig4, fig5):
        assert check_figure(f) == [], check_figure(f)  # every helper follows the book style
        plt.close(f)
    wide = plot_pca([images[0]] * 8, pca_rgb(planted_scene(n=8, h=4, w=4)[0]))  # 8 x 2 in asked: shrunk to the page
    assert wide.get_figwidth() <= PAGE_WIDTH and check_figure(wide) == []
    plt.close(wide)


def test_check_figure_finds_each_style_problem():
    use_book_style()
    fig, axes = plt.subplots(1, 2, figsize=(PAGE_WIDTH, 3))
    image = axes[0].imshow(np.random.rand(4, 4))
    fig.colorbar(image, ax=axes[0], label="value")
    axes[1].plot([0, 1], [0, 1])
    axes[1].set_title("fine")
    assert check_figure(fig) == []

    axes[1].set_title("tiny", fontsize=MIN_FONT_SIZE - 3)
    assert any("'tiny' is 8 pt" in p for p in check_figure(fig))
    axes[1].set_title("fine")
    axes[1].imshow(np.random.rand(4, 4), cmap="magma")  # a second colour scale without a bar
    assert any("no colour bar" in p for p in check_figure(fig))
    plt.close(fig)

    fig, axes = plt.subplots(2, 1, figsize=(PAGE_WIDTH + 2, 3), layout="none")  # no constrained layout
    fig.subplots_adjust(hspace=0)
    axes[1].set_title("a title pushed into the axes above")
    problems = check_figure(fig)
    assert any("overlaps another axes" in p for p in problems) and any("wide" in p for p in problems)
    plt.close(fig)

    fig, ax = plt.subplots()  # masks drawn with a qualitative colour map need no colour bar
    ax.imshow(np.random.randint(0, 3, (4, 4)), cmap="tab20", interpolation="nearest")
    assert check_figure(fig) == []
    plt.close(fig)


def test_glue_publishes_a_plain_number_for_the_prose(monkeypatch):
    # the book's prose prints measured numbers through glue; numpy 2 would show np.float64(7.25)
    pytest.importorskip("myst_nb")
    import myst_nb.ext.glue as myst_glue

    from dinolite.viz import glue

    published = []
    monkeypatch.setattr(myst_glue, "ipy_display", lambda data, raw, metadata: published.append((data, metadata)))
    glue("gap", np.float64(7.25))
    glue("count", torch.tensor(3))
    (gap, gap_meta), (count, _) = published
    assert gap_meta["scrapbook"]["name"] == "gap"
    assert list(gap.values()) == ["7.25"] and all(k.startswith("application/papermill") for k in gap)  # not shown in place
    assert list(count.values()) == ["3"]
    with pytest.raises(TypeError, match="takes a number"):
        glue("word", "less")
