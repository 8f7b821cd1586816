"""Curation at pool scale: copy detection and hierarchical k-means on random 256-d embeddings,
against a brute-force torch kNN and scikit-learn's MiniBatchKMeans measured in the same run.

The pool: N unit vectors around N/100 random centres, plus 1% planted near-copies (cosine 0.7-0.98
to their original), so that copy detection has something to find and its recall can be checked.

    python benchmarks/curation.py              # N = 100k (a CI-sized machine: minutes on 2 cores)
    python benchmarks/curation.py --n 1000000  # the issue's size

The torch peer is timed on the first 20k queries (--torch-queries) and scaled to all N: each
query costs the same (one row of the N x N similarity matrix and its top-k), so its time is
linear in the number of queries.

Printed ratios are peer time / dinolite time (> 1: dinolite is faster) and k-means inertia ratios.

Per image, the command's two passes over the pool are timed on --images real photographs
(scikit-image's, tiled, at 32 px): the backbone embedding (a random tiny-cpu ViT, as without
--checkpoint) and the copy descriptor (dinolite.copydetect: thumbnails and their 8 views), in
seconds per 1,000 images.
"""
import argparse
import math
import time

import numpy as np
import torch
from sklearn.cluster import MiniBatchKMeans  # only the benchmark uses scikit-learn

from dinolite import curation


def make_pool(n: int, d: int, seed: int = 0):
    """(embeddings [n, d] unit rows, source [n]: the row each planted copy was made from, else itself)."""
    rng = np.random.default_rng(seed)
    n_copies = n // 100
    n_orig = n - n_copies
    centres = rng.standard_normal((max(1, n_orig // 100), d)).astype(np.float32)
    x = np.empty((n, d), dtype=np.float32)
    for start in range(0, n_orig, 100_000):  # in chunks: 1 M x 256 floats is 1 GB
        stop = min(start + 100_000, n_orig)
        x[start:stop] = centres[rng.integers(0, len(centres), stop - start)] \
            + 1.5 * rng.standard_normal((stop - start, d), dtype=np.float32)
    originals = rng.choice(n_orig, n_copies, replace=False)
    target_cos = rng.uniform(0.7, 0.98, (n_copies, 1)).astype(np.float32)
    x[:n_orig] /= np.linalg.norm(x[:n_orig], axis=1, keepdims=True)
    noise = rng.standard_normal((n_copies, d), dtype=np.float32)
    noise -= (noise * x[originals]).sum(1, keepdims=True) * x[originals]  # orthogonal to the original
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    x[n_orig:] = target_cos * x[originals] + np.sqrt(1 - target_cos**2) * noise
    return x, np.concatenate([np.arange(n_orig), originals])


def torch_knn(x: np.ndarray, k: int, max_queries: int | None, chunk: int = 4096):
    """Brute-force kNN of every row (matrix product + topk in chunks). Returns (seconds, neighbours).

    With max_queries, only that many queries are searched and the time is scaled to all rows.
    """
    database = torch.from_numpy(x)
    n_queries = len(x) if max_queries is None else min(max_queries, len(x))
    neighbours = []
    start = time.perf_counter()
    for s in range(0, n_queries, chunk):
        neighbours.append((database[s : min(s + chunk, n_queries)] @ database.T).topk(k, dim=1).indices)
    seconds = (time.perf_counter() - start) * len(x) / n_queries
    return seconds, torch.cat(neighbours).numpy()


def per_image_costs(n_images: int) -> None:
    """Seconds per 1,000 images of the embedding pass and of the copy-descriptor pass, same images."""
    import warnings

    from dinolite import copydetect
    from dinolite.curate import load_backbone
    from dinolite.data.photos import photo_tiles

    tiles = photo_tiles()
    images = [tiles[i % len(tiles)] for i in range(n_images)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-backbone warning
        backbone, cfg, _ = load_backbone(None, None)
    t_embed, _ = timed(curation.embed, images, backbone, image_size=cfg.crops.global_size, progress=False)
    t_describe, _ = timed(lambda: copydetect.describe_views(copydetect.thumbnails(images, progress=False)))
    print(f"\n== per 1,000 images ({n_images} photo tiles, 32 px) ==\n"
          f"embedding (random tiny-cpu ViT, {cfg.crops.global_size} px): {1000 * t_embed / n_images:6.2f} s\n"
          f"copy descriptor (thumbnail + 8 views):      {1000 * t_describe / n_images:6.2f} s\n")


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def inertia(x: np.ndarray, centroids: np.ndarray) -> float:
    dist, _ = curation._assign(x, np.ascontiguousarray(centroids, dtype=np.float32))
    return float(dist.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="pool size")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--k", type=int, default=64, help="neighbours in copy detection (DINOv2: 64)")
    parser.add_argument("--levels", default=None, help="hierarchical k-means levels (default N/100, N/1000, N/10000)")
    parser.add_argument("--images", type=int, default=1000, help="images timed for the per-image costs")
    parser.add_argument("--torch-queries", type=int, default=20_000,
                        help="queries timed for the torch peer, scaled to all N (0: all)")
    args = parser.parse_args()
    n, d = args.n, args.dim
    levels = [int(v) for v in args.levels.split(",")] if args.levels else [max(2, n // 100), max(2, n // 1000),
                                                                            max(2, n // 10_000)]
    torch_queries = args.torch_queries if 0 < args.torch_queries < n else None
    print(f"pool {n} x {d} (1% planted copies), k = {args.k}, {torch.get_num_threads()} torch threads")
    per_image_costs(args.images)
    x, source = make_pool(n, d)

    print("\n== copy detection: kNN graph + connected components ==")
    t_dedup, (kept, _) = timed(curation.find_duplicates, x, threshold=0.6, k=args.k)
    kind = "exact" if n <= curation.EXACT_SEARCH_MAX else "ivf"
    precision, recall = curation.duplicate_precision_recall(kept, source)
    print(f"dinolite find_duplicates ({kind} index): {t_dedup:8.1f} s   precision {precision:.3f} recall {recall:.3f}")
    t_search, _ = timed(curation.nearest_neighbours, x, x, args.k + 1, index=kind)
    print(f"  of which the faiss kNN search:           {t_search:8.1f} s")
    t_torch, torch_nn = torch_knn(x, args.k + 1, torch_queries)
    note = "" if torch_queries is None else f" (timed on {torch_queries} queries, scaled)"
    print(f"torch brute-force kNN{note}:            {t_torch:8.1f} s")
    _, faiss_nn = curation.nearest_neighbours(x[:2000], x, args.k + 1, index=kind)
    overlap = np.mean([len(np.intersect1d(a, b)) / len(a) for a, b in zip(faiss_nn, torch_nn[:2000])])
    print(f"  neighbour overlap faiss {kind} vs brute force (first 2000 queries): {overlap:.3f}")

    print(f"\n== hierarchical k-means, levels {levels} ==")
    t_hkm, hierarchy = timed(curation.hierarchical_kmeans, x, levels, resampling_steps=2, seed=0)
    t_km, (cent, _, _) = timed(curation.kmeans, x, levels[0], seed=0)
    mbk = MiniBatchKMeans(n_clusters=levels[0], batch_size=4096, n_init=1, random_state=0)
    t_mbk, _ = timed(mbk.fit, x)
    print(f"dinolite hierarchical_kmeans (3 levels, 2 resampling steps each): {t_hkm:8.1f} s")
    print(f"dinolite kmeans (level 0 only, k-means++ + faiss):             {t_km:8.1f} s")
    print(f"scikit-learn MiniBatchKMeans (k = {levels[0]}, k-means++):         {t_mbk:8.1f} s")
    i_km, i_mbk, i_hkm = inertia(x, cent), inertia(x, mbk.cluster_centers_), inertia(x, hierarchy.centroids[0])

    print("\n== ratios (peer time / dinolite time; > 1: dinolite faster) ==")
    print(f"torch brute-force kNN / dinolite find_duplicates:     {t_torch / t_dedup:6.2f}")
    print(f"torch brute-force kNN / faiss kNN search:              {t_torch / t_search:6.2f}")
    print(f"MiniBatchKMeans / dinolite kmeans (one level):         {t_mbk / t_km:6.2f}")
    print(f"MiniBatchKMeans / dinolite hierarchical_kmeans:        {t_mbk / t_hkm:6.2f}")
    print(f"inertia MiniBatchKMeans / dinolite kmeans:             {i_mbk / i_km:6.3f}  (> 1: dinolite fits better)")
    print(f"inertia MiniBatchKMeans / hierarchical level 0:        {i_mbk / i_hkm:6.3f}  (resampling trades "
          "inertia for balance)")
    assert math.isfinite(t_dedup)


if __name__ == "__main__":
    main()
