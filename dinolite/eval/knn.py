"""Weighted k-nearest-neighbour classification (DINO): no training at all; measures whether neighbours in feature
space share a label. Exact inner-product search with faiss, or plain torch."""
import numpy as np
import torch
import torch.nn.functional as F

from dinolite.eval.features import extract_features


def check_2d(x: torch.Tensor, name: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be [N, D], got shape {tuple(x.shape)}")
    return x.detach().float().cpu()


def search(queries: torch.Tensor, database: torch.Tensor, k: int, backend: str = "faiss", normalize: bool = True, batch_size: int = 4096):
    """Top-k database rows by inner product (cosine similarity when normalize).

    queries [Q, D], database [N, D] -> (scores [Q, k] descending, indices [Q, k] long).
    backend: "faiss" (IndexFlatIP, exact) or "torch" (matrix product + topk, in batches).
    """
    queries, database = check_2d(queries, "queries"), check_2d(database, "database")
    if queries.shape[1] != database.shape[1]:
        raise ValueError(f"queries have dim {queries.shape[1]} but the database has dim {database.shape[1]}")
    if not 1 <= k <= database.shape[0]:
        raise ValueError(f"k = {k} must be between 1 and the database size {database.shape[0]}")
    if normalize:
        queries, database = F.normalize(queries, dim=-1), F.normalize(database, dim=-1)
    if backend == "faiss":
        import faiss

        index = faiss.IndexFlatIP(database.shape[1])
        index.add(np.ascontiguousarray(database.numpy(), dtype=np.float32))
        scores, indices = index.search(np.ascontiguousarray(queries.numpy(), dtype=np.float32), k)
        return torch.from_numpy(scores), torch.from_numpy(indices).long()
    if backend == "torch":
        scores, indices = [], []
        for start in range(0, queries.shape[0], batch_size):
            s, i = (queries[start : start + batch_size] @ database.T).topk(k, dim=-1)
            scores.append(s)
            indices.append(i)
        return torch.cat(scores), torch.cat(indices)
    raise ValueError(f"unknown backend {backend!r}: use 'faiss' or 'torch'")


def knn_vote(scores: torch.Tensor, neighbour_labels: torch.Tensor, num_classes: int, temperature: float = 0.07) -> torch.Tensor:
    """DINO's weighted vote: class score = sum over neighbours of exp(similarity / T) for that class.

    scores [Q, k] cosine similarities, neighbour_labels [Q, k] -> class scores [Q, num_classes].
    """
    weights = (scores / temperature).exp()
    votes = torch.zeros(scores.shape[0], num_classes, dtype=weights.dtype)
    return votes.scatter_add_(1, neighbour_labels.long(), weights)


def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor | None = None,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    backend: str = "faiss",
) -> dict:
    """Weighted kNN classifier of DINO (k = 20, T = 0.07, cosine similarity).

    Returns dict(class_scores [Q, C], predictions [Q]) and, with test_labels, top1 accuracy in
    percent (and top5 when there are more than 5 classes).
    """
    train_features = check_2d(train_features, "train_features")
    train_labels = torch.as_tensor(train_labels).long().cpu()
    if train_labels.shape != (train_features.shape[0],):
        raise ValueError(f"train_labels must be [{train_features.shape[0]}], got {tuple(train_labels.shape)}")
    num_classes = int(train_labels.max()) + 1 if num_classes is None else num_classes
    k = min(k, train_features.shape[0])
    scores, indices = search(test_features, train_features, k, backend=backend)
    class_scores = knn_vote(scores, train_labels[indices], num_classes, temperature)
    result = {"class_scores": class_scores, "predictions": class_scores.argmax(dim=-1)}
    if test_labels is not None:
        test_labels = torch.as_tensor(test_labels).long().cpu()
        result["top1"] = 100.0 * (result["predictions"] == test_labels).float().mean().item()
        if num_classes > 5:
            top5 = class_scores.topk(5, dim=-1).indices
            result["top5"] = 100.0 * (top5 == test_labels[:, None]).any(dim=-1).float().mean().item()
    return result


@torch.no_grad()
def knn_accuracy(backbone, knn_data, k: int = 20, batch_size: int = 256) -> float:
    """Top-1 kNN accuracy (%) of `backbone`'s [CLS] features: knn_data = (memory dataset, query dataset) of
    (image tensor, label), e.g. dinolite.train.run.knn_datasets."""
    train_set, test_set = knn_data
    train_feats = extract_features(backbone, train_set, batch_size=batch_size, progress=False)
    test_feats = extract_features(backbone, test_set, batch_size=batch_size, progress=False)
    result = knn_classify(train_feats["cls"], train_feats["labels"], test_feats["cls"], test_feats["labels"], k=k)
    return result["top1"]
