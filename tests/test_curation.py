"""Data curation: copy detection, retrieval, hierarchical k-means, balanced sampling, the
`list:FILE` data spec and `python -m dinolite.curate`."""
import json
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from dinolite import curation
from dinolite.curate import load_backbone, main
from dinolite.data import ImageListDataset, build_dataset


def planted_pool(n=3000, d=128, n_copies=300, seed=0):
    """Unit vectors around 30 centres (the closest distinct pairs reach cosine ~0.6) plus near-copies
    at cosine 0.7-0.98 to their original.

    Returns (embeddings [n + n_copies, d], source [n + n_copies]: the original each row was made from).
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((30, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(0, 30, n)] + rng.standard_normal((n, d)) / np.sqrt(d) * rng.uniform(1.4, 2.0, (n, 1))
    x = curation.unit_rows(x.astype(np.float32))
    originals = rng.choice(n, n_copies, replace=True)  # some originals get several copies
    noise = rng.standard_normal((n_copies, d)).astype(np.float32)
    noise -= (noise * x[originals]).sum(1, keepdims=True) * x[originals]  # orthogonal to the original
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    cos = rng.uniform(0.7, 0.98, (n_copies, 1)).astype(np.float32)
    copies = cos * x[originals] + np.sqrt(1 - cos**2) * noise
    return np.concatenate([x, copies]), np.concatenate([np.arange(n), originals])


# ---------------------------------------------------------------------------------------------
# copy detection


def test_planted_duplicates_found_with_high_precision_and_recall():
    emb, source = planted_pool()
    copy_cos = np.einsum("nd,nd->n", emb[3000:], emb[source[3000:]])
    assert copy_cos.min() > 0.69  # the planted copies are above the threshold ...
    sims = emb[:3000] @ emb[:3000].T
    np.fill_diagonal(sims, 0)
    assert (sims > 0.45).sum() > 1000 and sims.max() > 0.58  # ... and many distinct pairs not far below it
    for index in ("exact", "ivf"):
        kept, groups = curation.find_duplicates(emb, threshold=0.6, k=64, index=index)
        precision, recall = curation.duplicate_precision_recall(kept, source)
        assert precision >= 0.95 and recall >= 0.95, (index, precision, recall)
        assert all(g[0] in kept and not np.isin(g[1:], kept).any() for g in groups)  # one kept per group
    # A threshold below the originals' similarities merges distinct images: precision drops.
    kept, _ = curation.find_duplicates(emb, threshold=0.3, k=64)
    assert curation.duplicate_precision_recall(kept, source)[0] < 0.5


def test_find_duplicates_connected_components_by_hand():
    # 0-1 copies (cos 0.8), 1-2 copies (cos 0.8) but 0-2 are not (cos 0.28): one component {0,1,2} by transitivity.
    a = np.array([1.0, 0.0, 0.0])
    b = np.array([0.8, 0.6, 0.0])
    c = np.array([0.28, 0.96, 0.0])
    far = np.array([0.0, 0.0, 1.0])
    kept, groups = curation.find_duplicates(np.stack([far, a, b, c, far * -1]), threshold=0.6, k=2)
    assert kept.tolist() == [0, 1, 4]
    assert [g.tolist() for g in groups] == [[1, 2, 3]]
    # exact copies of one image: one survives; nothing similar: all survive
    kept, groups = curation.find_duplicates(np.stack([a, a, a, far]))
    assert kept.tolist() == [0, 3] and [g.tolist() for g in groups] == [[0, 1, 2]]
    assert curation.find_duplicates(np.eye(5))[0].tolist() == [0, 1, 2, 3, 4]


def test_duplicate_precision_recall_by_hand():
    source = np.array([0, 1, 2, 0, 0, 1])  # groups {0,3,4}, {1,5}, {2}: a perfect run removes 3 images
    assert curation.duplicate_precision_recall([0, 1, 2], source) == (1.0, 1.0)
    assert curation.duplicate_precision_recall([3, 5, 2], source) == (1.0, 1.0)  # which one is kept does not matter
    p, r = curation.duplicate_precision_recall([0, 1], source)  # image 2 removed wrongly
    assert (p, r) == (3 / 4, 1.0)
    p, r = curation.duplicate_precision_recall([0, 1, 2, 3], source)  # one copy missed
    assert (p, r) == (1.0, 2 / 3)


# ---------------------------------------------------------------------------------------------
# retrieval


def test_retrieve_takes_k_neighbours_per_seed_image():
    emb, source = planted_pool(n=500, n_copies=0)
    seeds = emb[[3, 7]] + 0.01
    indices, neighbours, sims = curation.retrieve(seeds, emb, k=4, return_neighbours=True)
    assert neighbours.shape == (2, 4) and neighbours[:, 0].tolist() == [3, 7]
    unit = curation.unit_rows(emb)
    brute = np.argsort(-(curation.unit_rows(seeds) @ unit.T), axis=1)[:, :4]
    assert np.array_equal(neighbours, brute)
    assert indices.tolist() == sorted(set(brute.ravel().tolist()))
    assert np.all(np.diff(sims, axis=1) <= 0)
    # retrieval is by rank, not by a similarity threshold: far-away seed images still get k images
    assert len(curation.retrieve(-emb[:1], emb, k=4)) == 4


def test_sample_from_seed_clusters_draws_from_the_seed_cluster():
    emb, _ = planted_pool(n=600, n_copies=0)
    chosen = curation.sample_from_seed_clusters(emb[:2], emb, n_clusters=20, per_seed=5, seed=0)
    centroids, assignment, _ = curation.kmeans(curation.unit_rows(emb), 20, seed=0)
    clusters, hits = np.unique(assignment[:2], return_counts=True)
    assert set(assignment[chosen].tolist()) <= set(clusters.tolist())  # only from the seed images' clusters
    assert len(chosen) == sum(min(5 * h, (assignment == c).sum()) for c, h in zip(clusters, hits))


# ---------------------------------------------------------------------------------------------
# k-means++ and hierarchical k-means


def test_init_centroids_is_kmeans_plus_plus():
    # Two far groups: k-means++ puts one centroid in each (the second is drawn with probability ~1 from the other group).
    x = np.concatenate([np.zeros((50, 2)), np.full((50, 2), 100.0)]).astype(np.float32)
    x += np.random.default_rng(0).standard_normal(x.shape).astype(np.float32) * 0.01
    for seed in range(10):
        c = curation.init_centroids(x, 2, seed=seed)
        assert sorted(np.round(c[:, 0] / 100).tolist()) == [0.0, 1.0]
    c = curation.init_centroids(x, 100, seed=0)  # every point, each once
    assert len(np.unique(c, axis=0)) == 100
    with pytest.raises(ValueError, match="between 1 and 100"):
        curation.init_centroids(x, 101)


def test_hierarchical_kmeans_levels_nest():
    emb, _ = planted_pool(n=1500, n_copies=0)
    h = curation.hierarchical_kmeans(emb, levels=[40, 10, 3], resampling_steps=[2, 1, 1], seed=0)
    assert [len(c) for c in h.centroids] == [40, 10, 3]
    assert h.assignments[0].shape == (1500,) and h.assignments[1].shape == (40,) and h.assignments[2].shape == (10,)
    for level in range(1, 3):
        fine, coarse = h.labels(level - 1), h.labels(level)
        for cluster in np.unique(fine):  # every cluster lies inside one cluster of the level above
            assert len(np.unique(coarse[fine == cluster])) == 1
        assert h.sizes(level).sum() == 1500
    assert np.all(h.distances >= 0)
    _, nearest = curation._assign(emb, h.centroids[0])
    assert np.array_equal(nearest, h.assignments[0])  # points sit in the cluster of their nearest centroid
    with pytest.raises(ValueError, match="only 40 clusters at level 0"):
        curation.hierarchical_kmeans(emb, levels=[40, 50])


def test_resampling_spreads_centroids_over_a_long_tail():
    # Exponential density along x: plain k-means puts most centroids where the data is densest;
    # resampling (equal weight per cluster, k-means again) moves them out along the tail.
    rng = np.random.default_rng(0)
    x = np.stack([rng.exponential(1.0, 2000), rng.uniform(0, 1, 2000)], 1).astype(np.float32)
    for seed in range(3):
        plain = curation.hierarchical_kmeans(x, [20], resampling_steps=0, seed=seed)
        resampled = curation.hierarchical_kmeans(x, [20], resampling_steps=3, sample_size=10, seed=seed)
        assert np.median(resampled.centroids[0][:, 0]) > np.median(plain.centroids[0][:, 0]) + 0.3
        assert resampled.sizes(0).sum() == 2000


# ---------------------------------------------------------------------------------------------
# balanced sampling


def test_balanced_quotas_by_hand():
    # sizes 100, 10, 5, 1 and target 40: cap 24 (24 + 10 + 5 + 1 = 40)
    quotas, cap = curation.balanced_quotas([100, 10, 5, 1], 40)
    assert cap == 24 and quotas.tolist() == [24, 10, 5, 1]
    # target 21: cap 7 gives 7 + 7 + 5 + 1 = 20, cap 8 would give 22; the one left goes to a cluster larger than 7
    quotas, cap = curation.balanced_quotas([100, 10, 5, 1], 21)
    assert cap == 7 and quotas.sum() == 21 and quotas.tolist() in ([8, 7, 5, 1], [7, 8, 5, 1])
    quotas, cap = curation.balanced_quotas([3, 3, 3], 9)
    assert quotas.tolist() == [3, 3, 3]
    with pytest.raises(ValueError, match="between 0 and the number of images 9"):
        curation.balanced_quotas([3, 3, 3], 10)


def _hand_hierarchy():
    """Two top clusters: A = level-0 clusters {0 (60 points), 1 (20)}, B = {2 (8), 3 (2)}; 90 points."""
    sizes = [60, 20, 8, 2]
    assignment0 = np.repeat(np.arange(4), sizes)
    distances = np.concatenate([np.arange(s, dtype=np.float32)[::-1] for s in sizes])  # last point of a cluster closest
    centroids = [np.zeros((4, 2), np.float32), np.zeros((2, 2), np.float32)]
    return curation.Hierarchy(centroids, [assignment0, np.array([0, 0, 1, 1])], distances)


def test_balanced_sample_hits_target_exactly_and_caps_large_clusters():
    h = _hand_hierarchy()
    for target in range(1, 91):
        chosen = curation.balanced_sample(h, target, seed=target)
        assert len(chosen) == target and len(np.unique(chosen)) == target
    # target 30: top level sizes (80, 10) -> cap 20 -> A gets 20, B gets 10 (all of it);
    # A splits 20 over (60, 20) -> cap 10 -> 10 and 10; B splits 10 over (8, 2) -> 8 and 2.
    chosen = curation.balanced_sample(h, 30)
    counts = np.bincount(h.assignments[0][chosen], minlength=4)
    assert counts.tolist() == [10, 10, 8, 2]
    # "closest": cluster 0 gives its 10 points with the smallest distance (its last 10)
    assert np.array_equal(chosen[:10], np.arange(50, 60))
    random_pick = curation.balanced_sample(h, 30, strategy="random", seed=1)
    assert np.bincount(h.assignments[0][random_pick], minlength=4).tolist() == [10, 10, 8, 2]
    # a random sample of 30 would take ~20 from cluster 0; the balanced sample caps it at 10
    with pytest.raises(ValueError, match="larger than the pool"):
        curation.balanced_sample(h, 91)


def test_balanced_sample_evens_out_a_long_tail_of_classes():
    rng = np.random.default_rng(0)
    counts = (400 * 0.5 ** np.arange(8)).astype(int)  # 400, 200, ..., 3: a long tail
    labels = np.repeat(np.arange(8), counts)
    x = (rng.standard_normal((8, 32)) * 5)[labels] + rng.standard_normal((len(labels), 32))
    h = curation.hierarchical_kmeans(x.astype(np.float32), [16, 8], seed=0)
    chosen = curation.balanced_sample(h, 100)
    random_pick = rng.choice(len(labels), 100, replace=False)
    balanced, pool, rand = (curation.class_balance(labels[i], 8) for i in (chosen, np.arange(len(labels)), random_pick))
    assert balanced["normalized_entropy"] > rand["normalized_entropy"] + 0.15
    assert balanced["largest_share"] < 0.3 < pool["largest_share"]


def test_class_balance_by_hand():
    b = curation.class_balance([0, 0, 1, 1], num_classes=4)
    assert b["entropy"] == pytest.approx(np.log(2)) and b["normalized_entropy"] == pytest.approx(0.5)
    assert (b["largest_share"], b["smallest_share"], b["counts"]) == (0.5, 0.0, [2, 2, 0, 0])


# ---------------------------------------------------------------------------------------------
# errors


def test_clear_errors():
    emb = np.eye(4, dtype=np.float32)
    with pytest.raises(ValueError, match="empty"):
        curation.find_duplicates(np.zeros((0, 8)))
    nan = emb.copy()
    nan[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"1 row\(s\) with NaN or inf \(first: row 2\)"):
        curation.find_duplicates(nan)
    with pytest.raises(ValueError, match="NaN"):
        curation.hierarchical_kmeans(nan, [2])
    with pytest.raises(ValueError, match="seed set has dimension 3 but the pool has dimension 4"):
        curation.retrieve(np.ones((2, 3)), emb)
    with pytest.raises(ValueError, match="seed set has dimension 3"):
        curation.sample_from_seed_clusters(np.ones((2, 3)), emb, 2, 1)
    h = curation.hierarchical_kmeans(emb, [2])
    with pytest.raises(ValueError, match="target 5 is larger than the pool \\(4 images\\)"):
        curation.balanced_sample(h, 5)
    with pytest.raises(ValueError, match="threshold"):
        curation.find_duplicates(emb, threshold=1.5)
    with pytest.raises(ValueError, match="all zeros"):
        curation.find_duplicates(np.zeros((3, 4)))


# ---------------------------------------------------------------------------------------------
# embeddings


def test_embed_normalises_and_memory_maps(tmp_path):
    torch.manual_seed(0)
    from dinolite.eval import extract_features
    from dinolite.models import VisionTransformer

    model = VisionTransformer(img_size=16, patch_size=8, embed_dim=24, depth=1, num_heads=2)
    data = build_dataset("textures:n=40,size=16")
    out = curation.embed(data, model, batch_size=2, output=tmp_path / "emb.npy", progress=False)  # chunks of 32
    assert isinstance(out, np.memmap) and out.shape == (40, 24)
    assert np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    from dinolite.data import EvalTransform
    reference = extract_features(model, build_dataset("textures:n=40,size=16", transform=EvalTransform(16, 16)),
                                 progress=False)["cls"]
    assert np.allclose(out, torch.nn.functional.normalize(reference, dim=-1).numpy(), atol=1e-5)
    again = curation.embed("textures:n=40,size=16", model, batch_size=8, progress=False)  # a spec, one chunk
    assert np.allclose(again, out, atol=1e-5)
    assert sorted(os.listdir(tmp_path)) == ["emb.npy"]  # no partial file left behind
    with pytest.raises(ValueError, match="empty"):
        curation.embed(torch.utils.data.TensorDataset(torch.zeros(0, 3, 16, 16)), model, progress=False)


# ---------------------------------------------------------------------------------------------
# list:FILE spec


def test_list_spec_reads_paths_labels_and_reports_problems(tmp_path):
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / f"im{i}.png")
    (tmp_path / "sub").mkdir()
    listing = tmp_path / "sub" / "list.txt"
    listing.write_text(f"# a comment\n../im0.png\t2\n{tmp_path / 'im1.png'}\n\n../im2.png\t0\n")
    ds = build_dataset(f"list:{listing}")
    assert isinstance(ds, ImageListDataset) and len(ds) == 3
    assert [label for _, label in ds.samples] == [2, -1, 0] and ds.num_classes == 3
    image, label = ds[0]
    assert image.size == (8, 8) and label == 2 and np.asarray(image)[0, 0, 0] == 0
    listing.write_text("../im0.png\n../missing.png\n")
    with pytest.raises(FileNotFoundError, match="line 2: image .*missing.png does not exist"):
        build_dataset(f"list:{listing}")
    listing.write_text("../im0.png\tcat\n")
    with pytest.raises(ValueError, match="line 1: label 'cat' is not an integer"):
        build_dataset(f"list:{listing}")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_dataset(f"list:{tmp_path / 'nope.txt'}")
    with pytest.raises(ValueError, match="list needs a path"):
        build_dataset("list:")


# ---------------------------------------------------------------------------------------------
# backbone loading and the command line


def _tiny_cfg():
    from dinolite.train import apply_overrides, get_config
    return apply_overrides(get_config("tiny-cpu"), ["model.embed_dim=24", "model.depth=1", "model.num_heads=2",
                                                    "head.hidden_dim=32", "head.bottleneck_dim=16",
                                                    "head.dino_out_dim=16", "head.ibot_out_dim=16"])


def test_load_backbone_from_training_checkpoint_and_official_file(tmp_path):
    from dinolite.hub import export_official
    from dinolite.train import DINOv2MetaArch, build_optimizer
    from dinolite.train.config import save_config
    from dinolite.train.loop import training_state

    cfg = _tiny_cfg()
    torch.manual_seed(1)
    arch = DINOv2MetaArch(cfg)
    torch.save(training_state(arch, build_optimizer(arch.student, cfg), 7, cfg), tmp_path / "checkpoint_00000007.pth")
    x = torch.randn(2, 3, 32, 32)
    expected = arch.teacher.backbone.eval()(x)
    backbone, loaded_cfg, _ = load_backbone(str(tmp_path / "checkpoint_00000007.pth"), None)
    assert loaded_cfg.model.embed_dim == 24 and torch.equal(backbone(x), expected)
    torch.save(export_official(arch.teacher.backbone), tmp_path / "teacher_backbone_official.pth")
    with pytest.raises(ValueError, match="no config"):
        load_backbone(str(tmp_path / "teacher_backbone_official.pth"), None)
    save_config(cfg, tmp_path / "config.yaml")
    backbone, _, _ = load_backbone(str(tmp_path / "teacher_backbone_official.pth"), None)
    assert torch.equal(backbone(x), expected)
    with pytest.raises(ValueError, match="does not fit the model"):
        load_backbone(str(tmp_path / "teacher_backbone_official.pth"), "tiny-cpu")  # wrong architecture: strict


def test_cli_writes_a_usable_list_and_a_report(tmp_path, capsys):
    out = tmp_path / "curated"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(["--data", "textures:n=240,size=32", "--seed-images", "textures:n=3,size=32,seed=9",
                     "--output-dir", str(out), "--target", "60", "--levels", "12,4", "--batch-size", "64"])
    assert code == 0, capsys.readouterr().err
    assert any("randomly initialised" in str(w.message) for w in caught)
    report = json.loads((out / "report.json").read_text())
    assert report["selected"] == 60 and report["pool_images"] == 240
    assert report["retrieval"] == {"seed_images": 3, "k": 4, "retrieved": report["retrieval"]["retrieved"]}
    assert 1 <= report["retrieval"]["retrieved"] <= 12
    assert report["clusters"]["sampled"] == 60 - report["retrieval"]["retrieved"]
    assert sum(report["clusters"]["top_level_sizes_after"]) == report["clusters"]["sampled"]
    assert sum(report["clusters"]["top_level_sizes_before"]) == 240 - report["duplicates"]["removed"] \
        - report["retrieval"]["retrieved"]
    assert "list:" in capsys.readouterr().out
    ds = build_dataset(f"list:{out / 'curated.txt'}")  # the list trains as --data list:FILE
    assert len(ds) == 60 and ds.num_classes <= 12
    image, label = ds[0]
    original = build_dataset("textures:n=240,size=32")
    index = int(os.path.basename(ds.samples[0][0]).split(".")[0])
    assert np.array_equal(np.asarray(image), np.asarray(original[index][0])) and label == original[index][1]
    # the list of a list pool points at the original files, no copies
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-backbone warning again
        code = main(["--data", f"list:{out / 'curated.txt'}", "--output-dir", str(tmp_path / "again"),
                     "--target", "10"])
    assert code == 0
    again = build_dataset(f"list:{tmp_path / 'again' / 'curated.txt'}")
    assert len(again) == 10 and {p for p, _ in again.samples} <= {p for p, _ in ds.samples}
    assert not (tmp_path / "again" / "images").exists()


@pytest.mark.parametrize("argv, message", [
    (["--data", "textures:n=20", "--target", "21"], "--target 21 is larger than the pool (20 images"),
    (["--data", "textures:n=20", "--target", "0"], "--target must be >= 1"),
    (["--data", "nosuch:x", "--target", "5"], "bad --data spec 'nosuch:x'"),
    (["--data", "textures:n=20", "--target", "5", "--checkpoint", "/no/such.pth"], "does not exist"),
    (["--data", "textures:n=20", "--target", "5", "--levels", "a,b"], "--levels must be integers"),
])
def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(argv + ["--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
