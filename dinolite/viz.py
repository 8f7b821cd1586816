"""Look inside a backbone: PCA of patch features, [CLS] attention, high-norm tokens, plot grids;
and the book's figure style.

Computation functions return tensors; plot helpers (matplotlib only) return the Figure, so
notebooks can show or save them. Every figure of the book follows one style (use_book_style):
at most PAGE_WIDTH inches wide, no text smaller than MIN_FONT_SIZE points, a colour bar where
colour encodes a value, constrained layout so titles never overlap. check_figure lists the
places where a figure breaks these rules.
"""
import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# The book's figure style
# ---------------------------------------------------------------------------------------------
# The book's content column is about 750 px wide and an image is scaled to fit it, so a figure
# PAGE_WIDTH inches wide shows text of s points at about s * 750 / (72 * PAGE_WIDTH) ~ s px.
# 11 px is the smallest text that reads comfortably; a wider figure would shrink it further.
PAGE_WIDTH = 10.0
MIN_FONT_SIZE = 11.0

BOOK_STYLE = {
    "figure.figsize": (PAGE_WIDTH, 3.5),
    "figure.dpi": 100,
    "figure.constrained_layout.use": True,  # titles, labels and colour bars never overlap
    "font.size": 12,
    "axes.titlesize": 12,
    "axes.labelsize": 12,
    "xtick.labelsize": 11,
    "ytick.labelsize": 11,
    "legend.fontsize": 11,
    "legend.title_fontsize": 11,
    "figure.titlesize": 13,
    "image.cmap": "viridis",
}


def use_book_style() -> None:
    """Apply BOOK_STYLE to matplotlib (every chapter calls it once, in its first cells)."""
    import matplotlib as mpl

    mpl.rcParams.update(BOOK_STYLE)


def _in_book_style(plot):
    """Run a plot helper under BOOK_STYLE, whatever style the caller has set (fonts are fixed when drawn)."""

    @functools.wraps(plot)
    def styled(*args, **kwargs):
        import matplotlib as mpl

        with mpl.rc_context(BOOK_STYLE):
            return plot(*args, **kwargs)

    return styled


def glue(name: str, value) -> None:
    """Publish a measured number for the prose: {glue:text}`name:.1f` in a markdown cell prints it.

    The book's text never types a number that a cell measures (tests/test_book_prose.py): it
    inserts it with MyST-NB's glue, so text and output cannot disagree. `value` is a Python,
    NumPy or 0-d torch number. Outside the book build (Colab, plain Jupyter, where myst_nb is not
    installed) this does nothing: the cell's own printout shows the value.
    """
    if hasattr(value, "item"):
        value = value.item()  # np.float64 and tensors: a plain float, whose text the prose can format
    if not isinstance(value, (int, float)):
        raise TypeError(f"glue({name!r}, ...) takes a number, got {type(value).__name__}")
    try:
        from myst_nb import glue as myst_glue
    except ImportError:
        return
    myst_glue(name, value, display=False)


def colorbar(mappable, ax, label: str):
    """A labelled colour bar beside ax (or a list of axes) for an image/scatter whose colour encodes a value."""
    return ax_figure(ax).colorbar(mappable, ax=ax, label=label, shrink=0.9)


def ax_figure(ax):
    """The figure that holds ax (or the first of a sequence / array of axes)."""
    first = ax if hasattr(ax, "figure") else np.asarray(ax, dtype=object).flat[0]
    return first.figure


def _is_categorical(image) -> bool:
    """Masks and label maps encode classes, not values: a qualitative colour map (tab10, tab20, ...)
    or a short list of colours (ListedColormap with at most 20 entries, explained by a legend)."""
    import matplotlib.colors

    cmap = image.get_cmap()
    qualitative = cmap.name.startswith(("tab", "Set", "Pastel", "Paired", "Accent", "Dark2"))
    return qualitative or (isinstance(cmap, matplotlib.colors.ListedColormap) and cmap.N <= 20)


def check_figure(fig) -> list[str]:
    """Where fig breaks the book style -> a list of one-line problems (empty: the figure is fine).

    Checks: width <= PAGE_WIDTH; every visible text >= MIN_FONT_SIZE; no title or label overlaps
    another axes or another text; every scalar image (2-D data through a colour map that is
    not a qualitative one) has a colour bar in the figure.
    """
    problems = []
    width = fig.get_figwidth()
    if width > PAGE_WIDTH + 1e-6:
        problems.append(f"figure is {width:.1f} in wide, more than PAGE_WIDTH = {PAGE_WIDTH} in")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for t in _drawn_texts(fig):
        if t.get_fontsize() < MIN_FONT_SIZE - 1e-6:
            problems.append(f"text {t.get_text()[:30]!r} is {t.get_fontsize():g} pt, below MIN_FONT_SIZE = {MIN_FONT_SIZE:g}")
    axes = [ax for ax in fig.axes if ax.get_visible()]
    labels = []  # titles and axis labels: they must not run into other axes or each other
    for ax in axes:
        for t in (ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label):
            if t.get_visible() and t.get_text().strip():
                labels.append((ax, t, t.get_window_extent(renderer)))
    if fig._suptitle is not None and fig._suptitle.get_text().strip():
        labels.append((None, fig._suptitle, fig._suptitle.get_window_extent(renderer)))
    for owner, t, box in labels:
        for ax in axes:
            if ax is not owner and _overlap(box, ax.get_window_extent(renderer)):
                problems.append(f"{t.get_text()[:30]!r} overlaps another axes")
                break
    for i, (_, t1, b1) in enumerate(labels):
        for _, t2, b2 in labels[i + 1:]:
            if _overlap(b1, b2):
                problems.append(f"{t1.get_text()[:30]!r} overlaps {t2.get_text()[:30]!r}")
    # a colour bar covers every image drawn with its colour map and limits (one bar for a shared scale)
    scales = {_scale(ax._colorbar.mappable) for ax in axes if hasattr(ax, "_colorbar")}
    for ax in axes:
        for image in ax.get_images():
            scalar = np.ndim(image.get_array()) == 2 and not _is_categorical(image)
            if scalar and _scale(image) not in scales:
                problems.append(f"an image in axes {ax.get_title()[:30]!r} encodes values by colour but has no colour bar")
    return problems


def _scale(mappable) -> tuple:
    return mappable.get_cmap().name, float(mappable.norm.vmin), float(mappable.norm.vmax)


def _drawn_texts(fig) -> list:
    """Every non-empty text matplotlib draws: titles, tick and axis labels, annotations, legends."""
    texts = list(fig.texts) + [t for legend in fig.legends for t in legend.get_texts()]
    if fig._suptitle is not None:
        texts.append(fig._suptitle)
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        texts += [ax.title, ax._left_title, ax._right_title, *ax.texts]
        if ax.get_legend() is not None:
            texts += ax.get_legend().get_texts()
        if ax.axison:
            for axis in (ax.xaxis, ax.yaxis):
                texts += [axis.label, axis.get_offset_text(), *axis.get_ticklabels()]
    return [t for t in texts if t.get_visible() and t.get_text().strip()]


def _overlap(a, b, tolerance: float = 1.0) -> bool:
    """Window-coordinate boxes overlap by more than tolerance pixels in both directions."""
    return min(a.x1, b.x1) - max(a.x0, b.x0) > tolerance and min(a.y1, b.y1) - max(a.y0, b.y0) > tolerance


# ---------------------------------------------------------------------------------------------
# PCA of patch tokens (the DINOv2 visualisation)
# ---------------------------------------------------------------------------------------------


def _as_token_list(patch_tokens) -> tuple[list, bool]:
    """[n, h, w, D] tensor or list of [h, w, D] -> (list of [h, w, D] float tensors, was_list)."""
    if isinstance(patch_tokens, torch.Tensor):
        if patch_tokens.ndim != 4:
            raise ValueError(
                f"patch_tokens must be [n_images, h, w, D] (patch tokens only, on their grid), got shape "
                f"{tuple(patch_tokens.shape)}; reshape x_norm_patchtokens [n, h*w, D] to [n, h, w, D]"
            )
        return [t for t in patch_tokens.detach().float().cpu()], False
    tokens = [torch.as_tensor(t).detach().float().cpu() for t in patch_tokens]
    if not tokens or any(t.ndim != 3 for t in tokens):
        raise ValueError("a list of patch tokens must hold [h, w, D] tensors (one per image)")
    if len({t.shape[-1] for t in tokens}) != 1:
        raise ValueError("all images must have the same feature dimension D")
    return tokens, True


def _restore(values: torch.Tensor, grids, was_list):
    """Flat per-token rows [M, C] -> list of [h, w, C] (or a stacked tensor when the input was one)."""
    parts = list(values.split([h * w for h, w in grids]))
    parts = [p.reshape(h, w, -1) for p, (h, w) in zip(parts, grids)]
    return parts if was_list else torch.stack(parts)


def pca_fit(x: torch.Tensor, n_components: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Principal directions of rows x [M, D] -> (mean [D], components [n_components, D]).

    Signs are made deterministic: each component's largest-magnitude loading is positive.
    """
    if x.shape[0] < 2:
        raise ValueError("PCA needs at least 2 tokens")
    if not 1 <= n_components <= min(x.shape):
        raise ValueError(f"n_components must be between 1 and {min(x.shape)}, got {n_components}")
    mean = x.mean(0)
    _, _, vh = torch.linalg.svd((x - mean).double(), full_matrices=False)
    components = vh[:n_components]
    signs = torch.sign(components.gather(1, components.abs().argmax(1, keepdim=True)))
    return mean.float(), (components * signs).float()


def _minmax(x: torch.Tensor) -> torch.Tensor:
    """Per column to [0, 1]."""
    low, high = x.min(0).values, x.max(0).values
    return (x - low) / (high - low).clamp_min(1e-12)


def pca_foreground(patch_tokens, threshold: float = 0.5):
    """Foreground masks from the first principal component of the patch tokens.

    patch_tokens: [n, h, w, D] or a list of [h, w, D] (patch tokens only: no [CLS] or register
    tokens). The first component is fitted jointly over all images and scaled to [0, 1]; its sign
    is chosen so that patches on the image borders (usually background) score lower than the
    rest. Foreground = score > threshold. Returns bool masks [n, h, w] (or a list of [h, w]).
    """
    tokens, was_list = _as_token_list(patch_tokens)
    grids = [t.shape[:2] for t in tokens]
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in tokens])
    mean, components = pca_fit(x, 1)
    score = _minmax((x - mean) @ components.T)[:, 0]
    border = torch.cat([_border_mask(h, w).flatten() for h, w in grids])
    if not border.all() and score[border].mean() > score[~border].mean():
        score = 1 - score
    masks = _restore((score > threshold)[:, None], grids, was_list)
    return [m[..., 0] for m in masks] if was_list else masks[..., 0]


def _border_mask(h: int, w: int) -> torch.Tensor:
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[0], mask[-1], mask[:, 0], mask[:, -1] = True, True, True, True
    return mask


def pca_rgb(patch_tokens, n_components: int = 3, foreground_threshold: float | None = None):
    """Map patch tokens to colours with a PCA fitted jointly over all images.

    patch_tokens: [n, h, w, D] or a list of [h, w, D] (grids may differ): PATCH tokens only,
    e.g. extract_features(..., patch_tokens=True)["patch"] or
    forward_features(x)["x_norm_patchtokens"].reshape(n, h, w, D). Never include the [CLS] or
    register tokens (they are not on the grid and would distort the PCA).
    The first n_components (<= 3) principal components are scaled to [0, 1] jointly across all
    images (so equal colours mean similar features in different images) and used as RGB
    channels (missing channels are 0).
    foreground_threshold: as in DINOv2's figures, first separate foreground with the first
    component (see pca_foreground), then fit the colour PCA on foreground patches only;
    background patches are black.
    Returns [n, h, w, 3] in [0, 1] (or a list of [h, w, 3]).
    """
    if not 1 <= n_components <= 3:
        raise ValueError(f"n_components must be 1, 2 or 3 (RGB channels), got {n_components}")
    tokens, was_list = _as_token_list(patch_tokens)
    grids = [t.shape[:2] for t in tokens]
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in tokens])
    if foreground_threshold is None:
        keep = torch.ones(x.shape[0], dtype=torch.bool)
    else:
        masks = pca_foreground(tokens, foreground_threshold)
        keep = torch.cat([m.flatten() for m in masks])
        if keep.sum() <= n_components:
            raise ValueError(f"only {int(keep.sum())} foreground patches at threshold {foreground_threshold}; lower it")
    mean, components = pca_fit(x[keep], n_components)
    rgb = torch.zeros(x.shape[0], 3)
    rgb[keep, :n_components] = _minmax((x[keep] - mean) @ components.T)
    return _restore(rgb, grids, was_list)


# ---------------------------------------------------------------------------------------------
# [CLS] attention and token norms
# ---------------------------------------------------------------------------------------------
@torch.inference_mode()
def cls_attention_maps(model, images: torch.Tensor) -> torch.Tensor:
    """Attention of the [CLS] query to every patch, per head, in the last block.

    images [B, 3, H, W] -> [B, num_heads, h, w] (h = H / patch_size). Taken from
    model.get_last_self_attention (rows over all 1 + R + N keys sum to 1); the register keys and
    the [CLS] key itself are dropped, so a map sums to at most 1.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
    p = model.patch_size
    h, w = images.shape[-2] // p, images.shape[-1] // p
    attention = model.get_last_self_attention(images)
    prefix = 1 + model.num_register_tokens
    return attention[:, :, 0, prefix:].float().reshape(images.shape[0], -1, h, w)


def upsample_maps(maps: torch.Tensor, size, mode: str = "bilinear") -> torch.Tensor:
    """Patch-grid maps [..., h, w] -> [..., H, W] (to draw over the image)."""
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    align = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(flat, size=tuple(size), mode=mode, **align).reshape(*lead, *size)


@torch.inference_mode()
def patch_token_norms(model, images: torch.Tensor, prenorm: bool = True) -> torch.Tensor:
    """L2 norms of the output patch tokens, [B, h, w].

    prenorm=True uses the residual stream before the final LayerNorm (x_prenorm), where the
    high-norm "artifact" tokens of the registers paper stand out most; False uses
    x_norm_patchtokens.
    """
    out = model.forward_features(images)
    p = model.patch_size
    h, w = images.shape[-2] // p, images.shape[-1] // p
    tokens = out["x_prenorm"][:, 1 + model.num_register_tokens :] if prenorm else out["x_norm_patchtokens"]
    return tokens.float().norm(dim=-1).reshape(images.shape[0], h, w)


def high_norm_threshold(norms: torch.Tensor, factor: float = 2.0) -> float:
    """factor x the median token norm: normal tokens sit near the median, artifacts far above."""
    return factor * torch.as_tensor(norms).float().median().item()


def high_norm_tokens(norms: torch.Tensor, factor: float = 2.0) -> torch.Tensor:
    """Bool mask (same shape as norms) of tokens whose norm exceeds factor x median.

    The median is robust: a few percent of huge outliers barely move it (a mean or a
    mean + k std threshold is dragged up by the very outliers it should find).
    """
    norms = torch.as_tensor(norms).float()
    return norms > high_norm_threshold(norms, factor)


# ---------------------------------------------------------------------------------------------
# Plot helpers (each returns a matplotlib Figure)
# ---------------------------------------------------------------------------------------------
def to_display(image) -> np.ndarray:
    """PIL image, [3, H, W] tensor (ImageNet-normalised or in [0, 1]) or HxWx3 array -> HxWx3 floats in [0, 1].

    A dataset item (image, label, ...) is accepted too: its first element is shown.
    """
    if isinstance(image, (tuple, list)):
        image = image[0]
    if isinstance(image, torch.Tensor):
        x = image.detach().float().cpu()
        if x.ndim != 3 or x.shape[0] != 3:
            raise ValueError(f"image tensors must be [3, H, W], got {tuple(x.shape)}")
        if x.min() < 0 or x.max() > 1:  # ImageNet-normalised
            from dinolite.data.augment import denormalize

            x = denormalize(x)
        return x.permute(1, 2, 0).numpy()
    array = np.asarray(image)
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255
    return np.clip(array, 0, 1)


def _figure(nrows: int, ncols: int, panel: float, extra_height: float = 0.4, width_extra: float = 0.0):
    """Figure with nrows x ncols panels of panel inches, shrunk to fit PAGE_WIDTH; constrained layout."""
    import matplotlib.pyplot as plt

    panel = min(panel, (PAGE_WIDTH - width_extra) / ncols)
    figsize = (panel * ncols + width_extra, panel * nrows + extra_height * nrows)
    return plt.subplots(nrows, ncols, figsize=figsize, squeeze=False, layout="constrained")


def _grid(n: int, ncols: int | None, size: float = 2.0, titles: bool = True):
    ncols = min(n, ncols or 6)
    nrows = math.ceil(n / ncols)
    fig, axes = _figure(nrows, ncols, size, 0.4 if titles else 0.05)
    for ax in axes.flat:
        ax.axis("off")
    return fig, axes.flat


@_in_book_style
def plot_image_grid(images, titles=None, masks=None, ncols: int | None = None, mask_alpha: float = 0.5, size: float = 2.0):
    """Images (and optional class masks [H, W] drawn on top, class 0 left clear) in a grid -> Figure."""
    fig, axes = _grid(len(images), ncols, size, titles is not None)
    for i, (ax, image) in enumerate(zip(axes, images)):
        ax.imshow(to_display(image))
        if masks is not None:
            mask = np.asarray(torch.as_tensor(masks[i]).cpu(), dtype=float)
            ax.imshow(np.ma.masked_where(mask == 0, mask), cmap="tab20", alpha=mask_alpha, vmin=0, vmax=20, interpolation="nearest")
        if titles is not None:
            ax.set_title(str(titles[i]))
    return fig


@_in_book_style
def plot_pca(images, rgb, ncols: int | None = None, size: float = 2.0, titles=None):
    """Each image above its PCA colour map (rgb from pca_rgb, shown at the image size) -> Figure."""
    n = len(images)
    fig, axes = _figure(2, n, size, 0.4 if titles is not None else 0.05)
    for i in range(n):
        picture = to_display(images[i])
        colours = torch.as_tensor(rgb[i]).float().permute(2, 0, 1)
        colours = upsample_maps(colours, picture.shape[:2], mode="nearest").permute(1, 2, 0).numpy()
        axes[0, i].imshow(picture)
        axes[1, i].imshow(colours)
        if titles is not None:
            axes[0, i].set_title(str(titles[i]))
        for ax in axes[:, i]:
            ax.axis("off")
    return fig


@_in_book_style
def plot_attention_maps(image, maps: torch.Tensor, size: float = 2.0, alpha: float = 0.6, title: str | None = None,
                        vmax: float | None = None):
    """One image and its per-head [CLS] attention maps [heads, h, w], upsampled over it -> Figure.

    All heads share one colour scale, 0 to `vmax` (default: the largest weight), shown by a colour bar; give
    two figures the same vmax to compare two networks' maps by eye.
    """
    picture = to_display(image)
    heads = maps.shape[0]
    fig, axes = _figure(1, heads + 1, size, 0.4, width_extra=0.9)
    axes = axes[0]
    axes[0].imshow(picture)
    axes[0].set_title("image")
    upsampled = upsample_maps(maps, picture.shape[:2])
    top = float(upsampled.max()) if vmax is None else vmax
    for head in range(heads):
        ax = axes[head + 1]
        ax.imshow(picture)
        shown = ax.imshow(upsampled[head].numpy(), cmap="inferno", alpha=alpha, vmin=0, vmax=top)
        ax.set_title(f"head {head}")
    for ax in axes:
        ax.axis("off")
    fig.colorbar(shown, ax=list(axes), label="attention", shrink=0.9)
    if title is not None:
        fig.suptitle(title)
    return fig


@_in_book_style
def plot_norm_histograms(norms: dict, factor: float = 2.0, bins: int = 50, size: float = 3.0):
    """Histogram of token norms per model ({"name": norms}), with the factor x median threshold -> Figure."""
    import matplotlib.pyplot as plt

    width = min(size * 1.4 * len(norms), PAGE_WIDTH)
    fig, axes = plt.subplots(1, len(norms), figsize=(width, size), squeeze=False, layout="constrained")
    for ax, (name, values) in zip(axes[0], norms.items()):
        values = torch.as_tensor(values).float().flatten()
        threshold = high_norm_threshold(values, factor)
        outliers = int((values > threshold).sum())
        ax.hist(values.numpy(), bins=bins, color="tab:blue")
        ax.axvline(threshold, color="tab:red", linestyle="--", label=f"{factor:g} x median")
        ax.set_yscale("log")
        ax.set_xlabel("patch token norm")
        ax.set_title(f"{name}: {outliers}/{values.numel()} high-norm")
        ax.legend()
    return fig


@_in_book_style
def plot_retrieval(query_images, database_images, indices, scores=None, query_labels=None, database_labels=None, size: float = 1.6):
    """One row per query: the query, then its neighbours (indices [Q, k] into database_images) -> Figure.

    query_images / database_images: sequences of images or datasets of (image, label, ...) items.

    With labels, neighbours of the query's class get a green frame, others red.
    """
    indices = torch.as_tensor(indices)
    Q, k = indices.shape
    fig, axes = _figure(Q, k + 1, size, 0.4)
    for q in range(Q):
        axes[q, 0].imshow(to_display(query_images[q]))
        axes[q, 0].set_title("query")
        for j in range(k):
            ax = axes[q, j + 1]
            index = int(indices[q, j])
            ax.imshow(to_display(database_images[index]))
            if scores is not None:
                ax.set_title(f"{float(scores[q, j]):.2f}")
            if query_labels is not None and database_labels is not None:
                colour = "tab:green" if int(database_labels[index]) == int(query_labels[q]) else "tab:red"
                for spine in ax.spines.values():
                    spine.set_edgecolor(colour)
                    spine.set_linewidth(3)
        for ax in axes[q]:
            ax.set_xticks([])
            ax.set_yticks([])
    return fig
