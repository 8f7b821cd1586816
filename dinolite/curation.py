"""Data curation at small scale: what built LVD-142M (DINOv2) and LVD-1689M (DINOv3) from web pools.

    emb = embed("folder:~/photos", backbone)                   # [N, D] L2-normalised [CLS]
    kept, groups = find_duplicates(emb, threshold=0.6, k=64)    # copy detection
    near_seeds = retrieve(seed_emb, emb[kept], k=4)             # relevance to a curated seed set
    hierarchy = hierarchical_kmeans(emb[kept], levels=[100, 20])
    chosen = balanced_sample(hierarchy, target=500)             # spread evenly over clusters

DINOv2: copy detection on a ~1.2 B image pool with k = 64 neighbours and cosine >= 0.6, one
image kept per connected component; retrieval of 4 neighbours per image of curated seed sets
(or sampling from the seed image's k-means cluster for small seed sets). DINOv3: hierarchical
k-means (5 levels) and balanced sampling down the hierarchy. Every nearest-neighbour search and
every k-means here runs in faiss; only the k-means++ seeding (which faiss lacks) is ours.

Embeddings are float32 arrays [N, D]; indices are int64 arrays into them.
"""
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm  # a text bar: in a notebook a widget bar would leave an empty box in the built book

# Pools up to this size are searched exactly (faiss.IndexFlatIP); larger ones with an IVF index.
# Measured (find_duplicates on make_pool of benchmarks/curation.py, 256-d, k = 64, a busy 2-core
# CPU): IVF / exact time 1.0 at 5k, 0.8 at 10k, 0.65 at 20k, with every planted copy found by
# both. The exact search costs N^2 D but runs as a matrix product; IVF scans only nprobe / nlist
# of the pool, list by list, and must first train its cells, so it wins only on larger pools.
EXACT_SEARCH_MAX = 10_000


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------
def check_embeddings(embeddings, name: str = "embeddings") -> np.ndarray:
    """[N, D] array-like -> float32 C-contiguous numpy array; one-line ValueError if empty, not 2-D or not finite."""
    if isinstance(embeddings, torch.Tensor):
        embeddings = embeddings.detach().cpu().numpy()
    x = np.asarray(embeddings)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [N, D], got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 images): nothing to curate; check the data spec or folder")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has dimension 0; embed the images with a backbone first")
    x = np.ascontiguousarray(x, dtype=np.float32)
    for start in range(0, x.shape[0], 65536):  # in chunks: a memory-mapped pool may not fit in RAM twice
        finite = np.isfinite(x[start : start + 65536]).all(axis=1)
        if not finite.all():
            row = start + int(np.flatnonzero(~finite)[0])
            bad = sum(int((~np.isfinite(x[s : s + 65536]).all(axis=1)).sum()) for s in range(0, x.shape[0], 65536))
            raise ValueError(f"{name} has {bad} row(s) with NaN or inf (first: row {row}); re-embed those images "
                             "(a diverged backbone?) or drop them before curating")
    return x


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm (a new float32 array): inner products become cosine similarities."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"row {int(np.flatnonzero(norms[:, 0] == 0)[0])} of the embeddings is all zeros; "
                         "it has no direction to compare (drop it or re-embed it)")
    return (x / norms).astype(np.float32)


def _check_same_dim(seed: np.ndarray, pool: np.ndarray) -> None:
    if seed.shape[1] != pool.shape[1]:
        raise ValueError(f"the seed set has dimension {seed.shape[1]} but the pool has dimension {pool.shape[1]}; "
                         "embed both with the same backbone")


# ---------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------
class _ImagesOnly(torch.utils.data.Dataset):
    """Items of `dataset` as image tensors: PIL images go through `transform`, tensors pass as they are."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        item = self.dataset[i]
        image = item[0] if isinstance(item, (tuple, list)) else item
        return image if isinstance(image, torch.Tensor) else self.transform(image)


def embed(data, backbone: torch.nn.Module, image_size: int | None = None, batch_size: int = 64,
          output: str | os.PathLike | None = None, progress: bool = True, device=None,
          num_workers: int = 0) -> np.ndarray:
    """L2-normalised [CLS] embeddings [N, D] (float32) of every image of `data`.

    data: a --data spec string (see dinolite.data.DATA_SPEC_FORMS) or a Dataset whose items are
        an image or (image, label, ...); PIL images are resized and centre-cropped to image_size
        (default: backbone.img_size), tensors are used as they are.
    output: a .npy path. The embeddings are written chunk by chunk into a memory map (so a pool
        larger than RAM works), renamed into place when complete, and returned memory-mapped
        (np.load(output, mmap_mode="r") reads them again later).
    Features come from dinolite.eval.extract_features (x_norm_clstoken); one progress bar over images.
    """
    from dinolite.data import EvalTransform, build_dataset
    from dinolite.eval import extract_features

    size = image_size or backbone.img_size
    transform = EvalTransform(resize_size=size, crop_size=size)
    dataset = build_dataset(data, transform=transform) if isinstance(data, str) else _ImagesOnly(data, transform)
    n = len(dataset)
    if n == 0:
        raise ValueError("the pool is empty (0 images): nothing to embed; check the data spec or folder")
    chunk = batch_size * 16
    out, tmp = None, None
    with tqdm(total=n, desc="embedding", unit="img", disable=not progress) as bar:
        for start in range(0, n, chunk):
            part = torch.utils.data.Subset(dataset, range(start, min(start + chunk, n)))
            cls = extract_features(backbone, part, batch_size=batch_size, device=device, num_workers=num_workers,
                                   progress=False)["cls"]
            cls = F.normalize(cls.float(), dim=-1).numpy()
            if out is None:
                if output is None:
                    out = np.empty((n, cls.shape[1]), dtype=np.float32)
                else:
                    tmp = f"{os.fspath(output)}.partial.npy"
                    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, cls.shape[1]))
            out[start : start + len(cls)] = cls
            bar.update(len(cls))
    if output is None:
        return out
    out.flush()
    del out
    os.replace(tmp, output)
    return np.load(output, mmap_mode="r")


# ---------------------------------------------------------------------------------------------
# Nearest neighbours (faiss)
# ---------------------------------------------------------------------------------------------
def build_index(database: np.ndarray, index: str = "auto", nlist: int | None = None, nprobe: int = 16, seed: int = 0):
    """A faiss inner-product index holding `database` [N, D] (unit rows: cosine similarity).

    index: "exact" (IndexFlatIP), "ivf" (IndexIVFFlat: nlist k-means cells, a query visits the
    nprobe closest; default nlist = sqrt(N)) or "auto" (exact up to EXACT_SEARCH_MAX rows).
    """
    import faiss

    n, d = database.shape
    if index == "auto":
        index = "exact" if n <= EXACT_SEARCH_MAX else "ivf"
    if index == "exact":
        flat = faiss.IndexFlatIP(d)
        flat.add(database)
        return flat
    if index != "ivf":
        raise ValueError(f"index must be 'auto', 'exact' or 'ivf', got {index!r}")
    nlist = nlist or max(1, min(int(math.sqrt(n)), n // 39))
    quantizer = faiss.IndexFlatIP(d)
    ivf = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.cp.seed, ivf.cp.min_points_per_centroid, ivf.cp.niter = seed, 1, 10
    train = database
    if n > 64 * nlist:  # faiss would subsample to 256 points per cell anyway; 64 is plenty for cells
        train = database[np.random.default_rng(seed).choice(n, 64 * nlist, replace=False)]
    ivf.train(train)
    ivf.add(database)
    ivf.nprobe = min(nprobe, nlist)
    return ivf


def nearest_neighbours(queries: np.ndarray, database: np.ndarray, k: int, index: str = "auto",
                       progress: bool = False, chunk: int = 16384):
    """k most similar database rows of each query: (similarities [Q, k] descending, indices [Q, k]).

    Both inputs must already be unit rows. A missing neighbour (an IVF probe that found fewer
    than k) has index -1 and similarity -inf.
    """
    searcher = build_index(database, index)
    sims = np.empty((len(queries), k), dtype=np.float32)
    ids = np.empty((len(queries), k), dtype=np.int64)
    for start in tqdm(range(0, len(queries), chunk), desc="searching", disable=not progress):
        s, i = searcher.search(queries[start : start + chunk], k)
        sims[start : start + len(s)], ids[start : start + len(s)] = s, i
    sims[ids < 0] = -np.inf
    return sims, ids


# ---------------------------------------------------------------------------------------------
# Copy detection
# ---------------------------------------------------------------------------------------------
def find_duplicates(embeddings, threshold: float = 0.6, k: int = 64, index: str = "auto",
                    progress: bool = False) -> tuple[np.ndarray, list[np.ndarray]]:
    """Copy detection: link every image to its k nearest neighbours with cosine >= threshold and
    keep one image (the lowest index) of each connected component of that graph.

    Returns (kept [M] sorted indices, groups): groups lists the components with two or more
    images (each a sorted index array; its first entry is the one kept). DINOv2: k = 64,
    threshold 0.6, on embeddings of a copy-detection network.
    """
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is a cosine similarity and must be in [-1, 1], got {threshold}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    x = unit_rows(check_embeddings(embeddings))
    n = x.shape[0]
    k = min(k + 1, n)  # +1: each image finds itself first
    sims, ids = nearest_neighbours(x, x, k, index=index, progress=progress)
    rows = np.repeat(np.arange(n), k)
    cols, sims = ids.ravel(), sims.ravel()
    edge = (sims >= threshold) & (cols >= 0) & (cols != rows)
    kept, groups = connected_groups(n, rows[edge], cols[edge])
    return kept, groups


def connected_groups(n: int, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Connected components of the undirected graph on n nodes with edges rows[e] -- cols[e].

    Returns (kept [M]: the lowest index of every component, sorted; groups: the components with
    two or more nodes, each a sorted int64 array whose first entry is the kept one).
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    order = np.argsort(component, kind="stable")  # indices grouped by component, ascending inside each
    starts = np.flatnonzero(np.r_[True, component[order][1:] != component[order][:-1]])
    members = np.split(order, starts[1:])
    kept = np.sort(np.array([m[0] for m in members], dtype=np.int64))
    groups = [m.astype(np.int64) for m in members if len(m) > 1]
    return kept, groups


def duplicate_precision_recall(kept, source) -> tuple[float, float]:
    """Score a deduplication against known copies.

    source [N]: images with the same value are copies of one another (e.g. the index of the image
    they were made from). A removed image is a correct removal when an image of its group is kept.
    precision = correct removals / removals (1.0 when nothing was removed);
    recall = correct removals / (N - number of groups), the removals a perfect run makes.
    """
    source = np.asarray(source)
    is_kept = np.zeros(len(source), dtype=bool)
    is_kept[np.asarray(kept, dtype=np.int64)] = True
    group_has_kept = np.isin(source, source[is_kept])
    removed = ~is_kept
    correct = int((removed & group_has_kept).sum())
    should_remove = len(source) - len(np.unique(source))
    precision = correct / removed.sum() if removed.any() else 1.0
    recall = correct / should_remove if should_remove else 1.0
    return float(precision), float(recall)


# ---------------------------------------------------------------------------------------------
# Retrieval from seed sets
# ---------------------------------------------------------------------------------------------
def retrieve(seed_embeddings, pool_embeddings, k: int = 4, index: str = "auto", return_neighbours: bool = False):
    """Pool images near a curated seed set: the k nearest pool images of every seed image (DINOv2: k = 4).

    Returns the sorted unique pool indices [M]; with return_neighbours also the neighbours [S, k]
    of each seed image and their cosine similarities [S, k].
    """
    seed = unit_rows(check_embeddings(seed_embeddings, "seed embeddings"))
    pool = unit_rows(check_embeddings(pool_embeddings, "pool embeddings"))
    _check_same_dim(seed, pool)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    sims, ids = nearest_neighbours(seed, pool, min(k, len(pool)), index=index)
    indices = np.unique(ids[ids >= 0])
    return (indices, ids, sims) if return_neighbours else indices


def sample_from_seed_clusters(seed_embeddings, pool_embeddings, n_clusters: int, per_seed: int, seed: int = 0,
                              niter: int = 20) -> np.ndarray:
    """Retrieval for small seed sets (DINOv2): k-means the pool into n_clusters, then draw `per_seed`
    pool images (uniformly, without replacement) from the cluster of each seed image.

    A cluster hit by s seed images gives min(s * per_seed, its size) images. Returns sorted unique
    pool indices.
    """
    seeds = check_embeddings(seed_embeddings, "seed embeddings")
    pool = check_embeddings(pool_embeddings, "pool embeddings")
    _check_same_dim(seeds, pool)
    if per_seed < 1:
        raise ValueError(f"per_seed must be >= 1, got {per_seed}")
    centroids, assignment, _ = kmeans(unit_rows(pool), n_clusters, seed=seed, niter=niter)
    _, seed_cluster = _assign(unit_rows(seeds), centroids)
    rng = np.random.default_rng(seed)
    chosen = []
    hit_clusters, hits = np.unique(seed_cluster, return_counts=True)
    for cluster, count in zip(hit_clusters, hits):
        members = np.flatnonzero(assignment == cluster)
        chosen.append(rng.choice(members, min(len(members), count * per_seed), replace=False))
    return np.unique(np.concatenate(chosen)).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# k-means (faiss) with k-means++ seeding
# ---------------------------------------------------------------------------------------------
def init_centroids(x: np.ndarray, k: int, seed: int = 0, sample_size: int | None = None) -> np.ndarray:
    """k-means++ seeding: the first centroid uniformly at random, each next one a point drawn with
    probability proportional to its squared distance to the nearest centroid chosen so far.

    x [N, D] -> centroids [k, D] (copies of k distinct rows). sample_size: seed from a random
    subset of that many rows (k-means++ costs k passes over the data).
    """
    rng = np.random.default_rng(seed)
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"cannot pick {k} centroids from {n} points; k must be between 1 and {n}")
    if sample_size is not None and n > max(sample_size, k):
        x = x[np.sort(rng.choice(n, max(sample_size, k), replace=False))]
        n = x.shape[0]
    x64 = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    sq_norms = (x64 * x64).sum(1)
    chosen = [int(rng.integers(n))]
    closest = (sq_norms - 2 * x64 @ x64[chosen[0]] + sq_norms[chosen[0]]).clamp_min_(0)
    for _ in range(1, k):
        cumulative = np.cumsum(closest.double().numpy())
        if cumulative[-1] <= 0:  # every point coincides with a centroid: take any unused one
            unused = np.setdiff1d(np.arange(n), chosen)
            nxt = int(rng.choice(unused))
        else:
            nxt = int(min(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"), n - 1))
        chosen.append(nxt)
        torch.minimum(closest, (sq_norms - 2 * x64 @ x64[nxt] + sq_norms[nxt]).clamp_min_(0), out=closest)
    return np.ascontiguousarray(x[chosen], dtype=np.float32)


def _assign(x: np.ndarray, centroids: np.ndarray):
    """Nearest centroid (L2) of every row: (squared distances [N], cluster ids [N])."""
    import faiss

    flat = faiss.IndexFlatL2(centroids.shape[1])
    flat.add(np.ascontiguousarray(centroids, dtype=np.float32))
    dist, ids = flat.search(x, 1)
    return dist[:, 0], ids[:, 0].astype(np.int64)


def kmeans(x: np.ndarray, k: int, seed: int = 0, niter: int = 20, init: np.ndarray | None = None,
           init_sample_size: int | None = None):
    """faiss k-means on x [N, D] from k-means++ centroids (or `init` [k, D]).

    Returns (centroids [k, D], assignment [N], squared distance to the assigned centroid [N]).
    k-means++ seeds from a random subset of init_sample_size points (default max(10000, 16 k)):
    it makes k passes over them, and the k-means iterations that follow see every point. faiss
    trains on at most 256 points per centroid (a random subset); every point is assigned.
    """
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    if init is None:
        init = init_centroids(x, k, seed=seed, sample_size=init_sample_size or max(10_000, 16 * k))
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, min_points_per_centroid=1, verbose=False)
    km.train(x, init_centroids=np.ascontiguousarray(init, dtype=np.float32))
    dist, assignment = _assign(x, km.centroids)
    return np.array(km.centroids), assignment, dist


def _closest_per_cluster(dist: np.ndarray, assignment: np.ndarray, k: int, sample_size: int) -> np.ndarray:
    """Indices of the (up to) sample_size points of each cluster closest to its centroid."""
    order = np.lexsort((dist, assignment))  # by cluster, then by distance
    sorted_clusters = assignment[order]
    first = np.searchsorted(sorted_clusters, np.arange(k))
    rank = np.arange(len(order)) - first[sorted_clusters]
    return np.sort(order[rank < sample_size])


@dataclass
class Hierarchy:
    """Nested clusters from hierarchical_kmeans.

    centroids[l]: [k_l, D] centroids of level l (level 0 is the finest).
    assignments[0]: [N] the level-0 cluster of each point; assignments[l] (l >= 1): [k_{l-1}] the
        level-l cluster of each level-(l-1) cluster (level l clusters the centroids of level l-1).
    distances: [N] squared distance of each point to its level-0 centroid.
    """

    centroids: list
    assignments: list
    distances: np.ndarray

    @property
    def num_levels(self) -> int:
        return len(self.centroids)

    @property
    def num_points(self) -> int:
        return len(self.assignments[0])

    def labels(self, level: int) -> np.ndarray:
        """[N] the level-`level` cluster of every point."""
        if not 0 <= level < self.num_levels:
            raise ValueError(f"level must be in [0, {self.num_levels - 1}], got {level}")
        labels = self.assignments[0]
        for l in range(1, level + 1):
            labels = self.assignments[l][labels]
        return labels

    def sizes(self, level: int) -> np.ndarray:
        """[k_level] number of points in each cluster of `level`."""
        return np.bincount(self.labels(level), minlength=len(self.centroids[level]))


def _per_level(value, levels, name):
    values = list(value) if isinstance(value, (list, tuple)) else [value] * len(levels)
    if len(values) != len(levels):
        raise ValueError(f"{name} has {len(values)} entries but there are {len(levels)} levels")
    return values


def hierarchical_kmeans(embeddings, levels, resampling_steps=2, sample_size=None, niter: int = 20,
                        seed: int = 0, progress: bool = False) -> Hierarchy:
    """Hierarchical k-means with resampling (DINOv3's curation; Vo et al. 2024).

    levels: clusters per level, finest first, e.g. [100, 20, 5]. Level 0 clusters the points,
        level l clusters the centroids of level l-1, so the levels nest by construction.
    Each level: k-means from k-means++ centroids, then `resampling_steps` times: take the
        `sample_size` points closest to each centroid, re-run k-means (new k-means++ seeding) on
        that union and reassign every point to the new centroids. In the union every cluster
        weighs at most sample_size points, so a dense region pulls fewer centroids and the
        centroids spread over the data's support instead of piling up where it is densest.
        sample_size default: the mean cluster size of the level, rounded up.
    resampling_steps and sample_size may be one value or one per level.
    """
    x = check_embeddings(embeddings)
    levels = [int(k) for k in levels]
    if not levels:
        raise ValueError("levels is empty; give the number of clusters of each level, finest first, e.g. [100, 20]")
    steps = _per_level(resampling_steps, levels, "resampling_steps")
    samples = _per_level(sample_size, levels, "sample_size")
    centroids, assignments = [], []
    points, distances = x, None
    bar = tqdm(total=sum(1 + s for s in steps), desc="hierarchical k-means", disable=not progress)
    for level, (k, n_steps, size) in enumerate(zip(levels, steps, samples)):
        if not 1 <= k <= len(points):
            below = "images" if level == 0 else f"clusters at level {level - 1}"
            raise ValueError(f"level {level} asks for {k} clusters but there are only {len(points)} {below}; "
                             "use fewer clusters (levels go from many clusters to few)")
        size = size or math.ceil(len(points) / k)
        cent, assign, dist = kmeans(points, k, seed=seed + level, niter=niter)
        bar.update(1)
        for step in range(n_steps):
            sample = _closest_per_cluster(dist, assign, k, size)
            if len(sample) < k:  # empty clusters: top the sample up so k-means has k points
                extra = np.setdiff1d(np.arange(len(points)), sample)[: k - len(sample)]
                sample = np.sort(np.concatenate([sample, extra]))
            cent, _, _ = kmeans(points[sample], k, seed=seed + 1000 * (step + 1) + level, niter=niter)
            dist, assign = _assign(points, cent)
            bar.update(1)
        centroids.append(cent)
        assignments.append(assign)
        if level == 0:
            distances = dist
        points = cent
    bar.close()
    return Hierarchy(centroids, assignments, distances)


# ---------------------------------------------------------------------------------------------
# Balanced sampling
# ---------------------------------------------------------------------------------------------
def balanced_quotas(sizes, target: int, seed: int = 0) -> tuple[np.ndarray, int]:
    """Split `target` over clusters of the given sizes as evenly as they allow.

    The cap x is the largest integer with sum(min(x, size)) <= target (binary search); each
    cluster gets min(x, size), and the remaining target - sum(min(x, size)) (fewer than the
    clusters larger than x) go one each to randomly chosen clusters larger than x.
    Returns (quotas [C] summing exactly to target, x).
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    total = int(sizes.sum())
    if not 0 <= target <= total:
        raise ValueError(f"target {target} must be between 0 and the number of images {total}")
    low, high = 0, int(sizes.max(initial=0))
    while low < high:
        mid = (low + high + 1) // 2
        if np.minimum(sizes, mid).sum() <= target:
            low = mid
        else:
            high = mid - 1
    quotas = np.minimum(sizes, low)
    rest = target - int(quotas.sum())
    if rest:
        larger = np.flatnonzero(sizes > low)
        quotas[np.random.default_rng(seed).choice(larger, rest, replace=False)] += 1
    return quotas, low


def balanced_sample(hierarchy: Hierarchy, target: int, strategy: str = "closest", seed: int = 0) -> np.ndarray:
    """Exactly `target` points spread evenly down the hierarchy (DINOv3's balanced sampling).

    Top level: split the target over its clusters with balanced_quotas (cap by binary search).
    Each cluster splits its quota over its children (clusters one level down) the same way,
    down to level 0, where a cluster gives its quota of points: the ones closest to its
    centroid (strategy "closest") or random ones ("random"). Returns sorted indices [target].
    """
    n = hierarchy.num_points
    if target > n:
        raise ValueError(f"target {target} is larger than the pool ({n} images); lower --target or add images")
    if target < 1:
        raise ValueError(f"target must be >= 1, got {target}")
    if strategy not in ("closest", "random"):
        raise ValueError(f"strategy must be 'closest' or 'random', got {strategy!r}")
    rng = np.random.default_rng(seed)

    def members(assignment, count):  # cluster c -> its members (sorted), for c in range(count)
        order = np.argsort(assignment, kind="stable")
        return np.split(order, np.searchsorted(assignment[order], np.arange(1, count)))

    top = hierarchy.num_levels - 1
    sizes = [hierarchy.sizes(level) for level in range(hierarchy.num_levels)]
    children = [None] + [members(hierarchy.assignments[l], len(hierarchy.centroids[l]))
                         for l in range(1, hierarchy.num_levels)]
    points = members(hierarchy.assignments[0], len(hierarchy.centroids[0]))
    quotas, _ = balanced_quotas(sizes[top], target, seed=int(rng.integers(2**31)))
    pending = [(top, c, int(q)) for c, q in enumerate(quotas) if q > 0]
    chosen = []
    while pending:
        level, cluster, quota = pending.pop()
        if level == 0:
            candidates = points[cluster]
            if strategy == "closest":
                picked = candidates[np.argsort(hierarchy.distances[candidates], kind="stable")[:quota]]
            else:
                picked = rng.choice(candidates, quota, replace=False)
            chosen.append(picked)
            continue
        kids = children[level][cluster]
        kid_quotas, _ = balanced_quotas(sizes[level - 1][kids], quota, seed=int(rng.integers(2**31)))
        pending += [(level - 1, int(kid), int(q)) for kid, q in zip(kids, kid_quotas) if q > 0]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Balance statistics
# ---------------------------------------------------------------------------------------------
def class_balance(labels, num_classes: int | None = None) -> dict:
    """How even a labelling is: entropy (nats) of the class shares, entropy / ln(C) (1 = perfectly
    balanced), and the largest and smallest class shares (classes with no image count as 0)."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size == 0:
        raise ValueError("no labels: the sample is empty")
    counts = np.bincount(labels, minlength=num_classes or 0)
    shares = counts / counts.sum()
    nonzero = shares[shares > 0]
    entropy = float(-(nonzero * np.log(nonzero)).sum())
    return {"entropy": entropy, "normalized_entropy": entropy / math.log(len(counts)) if len(counts) > 1 else 1.0,
            "largest_share": float(shares.max()), "smallest_share": float(shares.min()), "counts": counts.tolist()}
