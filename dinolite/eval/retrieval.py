"""Retrieval: nearest neighbours by cosine similarity; mAP and recall@k."""
import math

import torch

from dinolite.eval.knn import search


def retrieve(queries: torch.Tensor, database: torch.Tensor, k: int = 10, exclude_self: bool = False, backend: str = "faiss"):
    """Top-k neighbours of each query in the database by cosine similarity.

    exclude_self: queries ARE the database (same rows, same order); drop each query's own row.
    Returns (scores [Q, k], indices [Q, k]).
    """
    if not exclude_self:
        return search(queries, database, k, backend=backend)
    if queries.shape[0] != database.shape[0]:
        raise ValueError("exclude_self needs queries and database to be the same rows")
    scores, indices = search(queries, database, min(k + 1, database.shape[0]), backend=backend)
    own = indices == torch.arange(indices.shape[0])[:, None]
    # Keep the k best that are not the query itself (if ties hid it, drop the last column instead).
    drop = torch.where(own.any(1), own.float().argmax(1), torch.full((own.shape[0],), own.shape[1] - 1))
    keep = torch.ones_like(own)
    keep[torch.arange(own.shape[0]), drop] = False
    Q = indices.shape[0]
    return scores[keep].reshape(Q, -1)[:, :k], indices[keep].reshape(Q, -1)[:, :k]


def average_precision(relevant: torch.Tensor, num_relevant: int | None = None) -> float:
    """AP of one ranking: relevant [n] bools in rank order; mean of precision@i over relevant i.

    num_relevant: total relevant items in the database (default: those in the ranking).
    """
    relevant = torch.as_tensor(relevant).bool()
    num_relevant = int(relevant.sum()) if num_relevant is None else num_relevant
    if num_relevant == 0:
        return float("nan")
    ranks = torch.arange(1, relevant.numel() + 1, dtype=torch.float64)
    precision_at_hits = relevant.cumsum(0)[relevant].double() / ranks[relevant]
    return (precision_at_hits.sum() / num_relevant).item()


def retrieval_metrics(
    query_features: torch.Tensor,
    query_labels: torch.Tensor,
    database_features: torch.Tensor,
    database_labels: torch.Tensor,
    ks=(1, 5, 10),
    exclude_self: bool = False,
    backend: str = "faiss",
) -> dict:
    """mAP over the full ranking and recall@k (a relevant item among the top k), in percent.

    An item is relevant when its label equals the query's. Queries with no relevant item are
    skipped in mAP. exclude_self as in `retrieve`.
    """
    query_labels, database_labels = torch.as_tensor(query_labels).cpu(), torch.as_tensor(database_labels).cpu()
    n = database_features.shape[0] - (1 if exclude_self else 0)
    _, indices = retrieve(query_features, database_features, k=n, exclude_self=exclude_self, backend=backend)
    relevant = database_labels[indices] == query_labels[:, None]
    aps = [average_precision(row) for row in relevant]
    aps = [ap for ap in aps if not math.isnan(ap)]
    result = {"mAP": 100.0 * sum(aps) / max(len(aps), 1)}
    for k in ks:
        result[f"recall@{k}"] = 100.0 * relevant[:, :k].any(dim=1).float().mean().item()
    return result
