import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from dinolite.eval import (
    average_precision,
    cls_mean_patch,
    confusion_matrix,
    dense_linear_probe,
    extract_features,
    knn_classify,
    knn_vote,
    linear_probe,
    miou_from_confusion,
    retrieval_metrics,
    retrieve,
    search,
)


def clusters(n_per_class, num_classes, dim, spread, seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=g) * 5
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    return centres[labels] + spread * torch.randn(len(labels), dim, generator=g), labels


def test_knn_well_separated_clusters_are_perfect():
    train, train_y = clusters(30, 10, 32, 0.1, seed=0)
    g = torch.Generator().manual_seed(1)
    test_y = torch.arange(10).repeat(5)
    test = train[train_y == 0][:1] * 0  # placeholder for shape
    centres = torch.stack([train[train_y == c].mean(0) for c in range(10)])
    test = centres[test_y] + 0.1 * torch.randn(len(test_y), 32, generator=g)
    result = knn_classify(train, train_y, test, test_y)
    assert result["top1"] == 100.0 and result["top5"] == 100.0


def test_knn_with_shuffled_labels_is_at_chance():
    g = torch.Generator().manual_seed(0)
    C, n_test = 4, 2000
    train = torch.randn(2000, 16, generator=g)
    train_y = torch.randint(0, C, (2000,), generator=g)
    test = torch.randn(n_test, 16, generator=g)
    test_y = torch.randint(0, C, (n_test,), generator=g)  # independent of everything else
    top1 = knn_classify(train, train_y, test, test_y)["top1"]
    # Test labels are independent of the predictions, so correct ~ Binomial(n, 1/C): 5 sigma bound.
    sigma = 100 * math.sqrt((1 / C) * (1 - 1 / C) / n_test)
    assert abs(top1 - 100 / C) < 5 * sigma


def test_faiss_and_torch_search_agree():
    g = torch.Generator().manual_seed(0)
    database, queries = torch.randn(500, 24, generator=g), torch.randn(40, 24, generator=g)
    s_faiss, i_faiss = search(queries, database, k=20, backend="faiss")
    s_torch, i_torch = search(queries, database, k=20, backend="torch", batch_size=7)
    assert torch.equal(i_faiss, i_torch)
    torch.testing.assert_close(s_faiss, s_torch, atol=1e-5, rtol=1e-5)
    # and they are the cosine similarities of the reported neighbours, in descending order
    expected = F.normalize(queries, dim=-1)[:, None, :].mul(F.normalize(database, dim=-1)[i_torch]).sum(-1)
    torch.testing.assert_close(s_torch, expected, atol=1e-5, rtol=1e-5)
    assert (s_torch[:, 1:] <= s_torch[:, :-1]).all()
    labels = torch.randint(0, 5, (500,), generator=g)
    a = knn_classify(database, labels, queries, backend="faiss")["class_scores"]
    b = knn_classify(database, labels, queries, backend="torch")["class_scores"]
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_weighted_vote_hand_computed_four_points():
    # Four training points on the unit circle; query at angle 0; k = 3, T = 0.5.
    angles = torch.tensor([0.1, 0.5, 1.0, 3.0])
    train = torch.stack([angles.cos(), angles.sin()], dim=1)
    labels = torch.tensor([0, 1, 1, 0])
    query = torch.tensor([[1.0, 0.0]])
    result = knn_classify(train, labels, query, k=3, temperature=0.5, num_classes=2)
    w = [math.exp(math.cos(a) / 0.5) for a in (0.1, 0.5, 1.0)]
    expected = torch.tensor([[w[0], w[1] + w[2]]])
    torch.testing.assert_close(result["class_scores"], expected, rtol=1e-5, atol=1e-5)
    assert result["predictions"].item() == 1  # two closer-than-far neighbours of class 1 outvote one
    # the plain vote function on explicit neighbours
    votes = knn_vote(torch.tensor([[1.0, 0.0]]), torch.tensor([[2, 2]]), num_classes=3, temperature=1.0)
    torch.testing.assert_close(votes, torch.tensor([[0.0, 0.0, math.e + 1.0]]))


def test_linear_probe_on_linearly_separable_features():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 3, generator=g)
    x = torch.randn(2000, 16, generator=g)
    scores = (x @ W).sort(dim=-1).values
    x = x[scores[:, -1] - scores[:, -2] > 1.0][:600]  # keep a margin around the decision boundaries
    y = (x @ W).argmax(-1)  # linear decision regions, not clusters
    result = linear_probe(x[:400], y[:400], x[400:], y[400:], lrs=(1e-2, 1e-1, 1.0), weight_decays=(0.0, 1e-2), epochs=100)
    assert result["top1"] >= 99.0
    assert len(result["sweep"]) == 6 and result["val_top1"] == max(result["sweep"].values())
    # the returned probe is the classifier that was scored
    pred = result["probe"](x[400:]).argmax(-1)
    assert 100.0 * (pred == y[400:]).float().mean().item() == pytest.approx(result["top1"])


def test_stacked_sweep_matches_torch_adamw():
    from dinolite.eval.linear import train_linear_sweep

    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(50, 5, generator=g), torch.randint(0, 3, (50,), generator=g)
    lrs, wds, epochs = [0.05, 0.2], [0.1, 0.0], 15
    weights, biases = train_linear_sweep(x, y, 3, lrs, wds, epochs, seed=7)
    for i, (lr, wd) in enumerate(zip(lrs, wds)):
        # slow obvious reference: one nn.Linear, torch.optim.AdamW (no decay on the bias), cosine
        init = 0.01 * torch.randn(5, 3, generator=torch.Generator().manual_seed(7))
        head = torch.nn.Linear(5, 3)
        with torch.no_grad():
            head.weight.copy_(init.T)
            head.bias.zero_()
        opt = torch.optim.AdamW([{"params": [head.weight], "weight_decay": wd}, {"params": [head.bias], "weight_decay": 0.0}], lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
        for _ in range(epochs):
            loss = F.cross_entropy(head(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        torch.testing.assert_close(weights[i], head.weight.detach().T, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(biases[i], head.bias.detach(), atol=1e-5, rtol=1e-4)


def test_linear_probe_beats_knn_on_linear_but_unclustered_labels():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(800, 8, generator=g)
    y = (x[:, 0] + 0.1 * x[:, 1] > 0).long()  # depends on one direction; the other 7 are noise
    lin = linear_probe(x[:600], y[:600], x[600:], y[600:], epochs=100)["top1"]
    knn = knn_classify(x[:600], y[:600], x[600:], y[600:])["top1"]
    assert lin > knn + 5


def test_confusion_matrix_and_miou_hand_computed():
    target = torch.tensor([[0, 0, 1], [1, 2, 255]])
    pred = torch.tensor([[0, 1, 1], [1, 1, 0]])
    conf = confusion_matrix(pred, target, num_classes=3, ignore_index=255)
    assert conf.tolist() == [[1, 1, 0], [0, 2, 0], [0, 1, 0]]
    metrics = miou_from_confusion(conf)
    # IoU_0 = 1 / (1 + 1) ; IoU_1 = 2 / (2 + 2) ; IoU_2 = 0 / 1
    torch.testing.assert_close(metrics["iou"], torch.tensor([0.5, 0.5, 0.0]))
    assert metrics["miou"] == pytest.approx(100 / 3)
    assert metrics["pixel_accuracy"] == pytest.approx(60.0)
    # a class absent from both target and prediction does not count in the mean
    conf4 = confusion_matrix(pred, target, num_classes=4, ignore_index=255)
    assert math.isnan(miou_from_confusion(conf4)["iou"][3].item())
    assert miou_from_confusion(conf4)["miou"] == pytest.approx(100 / 3)
    with pytest.raises(ValueError, match="ignore_index"):
        confusion_matrix(pred, target, num_classes=3, ignore_index=None)


def test_dense_probe_recovers_patch_classes():
    g = torch.Generator().manual_seed(0)
    N, h, w, D, C, scale = 40, 4, 4, 12, 3, 4
    patch_classes = torch.randint(0, C, (N, h, w), generator=g)
    codes = torch.randn(C, D, generator=g)
    patch = codes[patch_classes] + 0.1 * torch.randn(N, h, w, D, generator=g)
    masks = patch_classes.repeat_interleave(scale, 1).repeat_interleave(scale, 2)  # [N, 16, 16]
    masks[:, 0, 0] = 255  # some ignored pixels
    result = dense_linear_probe(patch[:30], masks[:30], patch[30:], masks[30:], num_classes=C, lr=0.1, epochs=30, batch_size=30)
    assert result["miou"] > 80.0
    # the reported mIoU is the one of the returned head, recomputed from scratch
    from dinolite.eval import dense_logits

    pred = dense_logits(result["head"], patch[30:], (16, 16)).argmax(1)
    conf = confusion_matrix(pred, masks[30:], C, ignore_index=255)
    assert torch.equal(conf, result["confusion"])
    # random features give a poor probe
    noise = dense_linear_probe(torch.randn(30, h, w, D, generator=g), masks[:30], torch.randn(10, h, w, D, generator=g), masks[30:], C, lr=0.1, epochs=30, batch_size=30)
    assert noise["miou"] < result["miou"] - 30


def test_average_precision_hand_computed():
    # ranking: relevant, not, relevant, not -> AP = (1/1 + 2/3) / 2
    assert average_precision(torch.tensor([1, 0, 1, 0])) == pytest.approx((1 + 2 / 3) / 2)
    # one of three relevant items never retrieved
    assert average_precision(torch.tensor([0, 1, 0, 1]), num_relevant=3) == pytest.approx((1 / 2 + 2 / 4) / 3)
    assert math.isnan(average_precision(torch.tensor([0, 0])))


def test_retrieval_metrics_on_hand_built_ranking():
    # database on the unit circle at increasing angle from the query direction (angle 0)
    angles = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])
    database = torch.stack([angles.cos(), angles.sin()], dim=1)
    database_labels = torch.tensor([1, 0, 1, 1, 0])  # ranking by similarity = this order
    query = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    query_labels = torch.tensor([1, 0])
    metrics = retrieval_metrics(query, query_labels, database, database_labels, ks=(1, 2))
    ap_label1 = (1 / 1 + 2 / 3 + 3 / 4) / 3  # relevant at ranks 1, 3, 4
    ap_label0 = (1 / 2 + 2 / 5) / 2  # relevant at ranks 2, 5
    assert metrics["mAP"] == pytest.approx(100 * (ap_label1 + ap_label0) / 2)
    assert metrics["recall@1"] == pytest.approx(50.0) and metrics["recall@2"] == pytest.approx(100.0)


def test_retrieve_exclude_self():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 8, generator=g)
    scores, indices = retrieve(x, x, k=5, exclude_self=True)
    assert indices.shape == (30, 5)
    assert not (indices == torch.arange(30)[:, None]).any()
    _, full = search(x, x, k=6)
    assert torch.equal(indices, full[:, 1:])  # own row is the first hit for distinct points


class PatchMeanModel(torch.nn.Module):
    """A stand-in backbone with the dinolite.models interface: patches -> linear -> tokens."""

    patch_size = 4
    embed_dim = 6

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Conv2d(3, self.embed_dim, self.patch_size, self.patch_size)

    def forward_features(self, x, masks=None):
        patch = self.proj(x).flatten(2).transpose(1, 2)
        return {"x_norm_clstoken": patch.mean(1), "x_norm_patchtokens": patch}

    def get_intermediate_layers(self, x, n=1, reshape=False, return_class_token=False, norm=True):
        patch = self.proj(x).flatten(2).transpose(1, 2)
        return tuple((patch * (i + 1), patch.mean(1) * (i + 1)) for i in range(n))


def test_extract_features_matches_direct_forward():
    torch.manual_seed(0)
    model = PatchMeanModel()
    images = torch.randn(10, 3, 8, 12)
    labels = torch.arange(10) % 3
    masks = torch.randint(0, 3, (10, 8, 12))
    out = extract_features(model, TensorDataset(images, labels, masks), batch_size=4, patch_tokens=True, n_last_layers=2, progress=False)
    direct = model.forward_features(images)
    torch.testing.assert_close(out["cls"], direct["x_norm_clstoken"])
    assert out["patch"].shape == (10, 2, 3, 6)
    # grid position (row 1, col 2) is token 1 * 3 + 2
    torch.testing.assert_close(out["patch"][:, 1, 2], direct["x_norm_patchtokens"][:, 5])
    assert torch.equal(out["labels"], labels) and torch.equal(out["masks"], masks)
    assert out["layer_cls"].shape == (10, 2, 6) and out["layer_patch"].shape == (10, 2, 2, 3, 6)
    torch.testing.assert_close(out["layer_cls"][:, 1], 2 * direct["x_norm_clstoken"])
    torch.testing.assert_close(cls_mean_patch(out["cls"], out["patch"]), torch.cat([out["cls"], out["cls"]], dim=1))
    # a plain tensor of images works too, and the model is left in its previous mode
    model.train()
    assert torch.equal(extract_features(model, images, progress=False)["cls"], out["cls"])
    assert model.training
    with pytest.raises(ValueError, match="multiple of the patch size"):
        extract_features(model, torch.randn(2, 3, 9, 8), progress=False)


def test_extract_features_with_a_vision_transformer():
    from dinolite.models import vit_tiny

    torch.manual_seed(0)
    model = vit_tiny(img_size=32, patch_size=8, depth=2, num_register_tokens=4)
    images = torch.randn(5, 3, 32, 48)
    out = extract_features(model, images, batch_size=2, patch_tokens=True, n_last_layers=1, progress=False)
    direct = model.eval().forward_features(images)
    torch.testing.assert_close(out["cls"], direct["x_norm_clstoken"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["patch"].reshape(5, 24, -1), direct["x_norm_patchtokens"], atol=1e-5, rtol=1e-5)
    # the last block's normalised output is the final feature
    torch.testing.assert_close(out["layer_cls"][:, 0], out["cls"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["layer_patch"][:, 0], out["patch"], atol=1e-5, rtol=1e-5)


def test_image_to_tensor():
    from PIL import Image

    from dinolite.eval import image_to_tensor

    image = Image.new("RGB", (50, 30), (124, 116, 104))  # ~ the ImageNet mean colour
    x = image_to_tensor(image, (16, 24), patch_size=8)
    assert x.shape == (3, 16, 24)
    expected = (torch.tensor([124, 116, 104]) / 255 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(x[:, 5, 5], expected, atol=1e-2, rtol=0)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        image_to_tensor(image, 30, patch_size=14)


# ----------------------------------------------------------------------------- paired sign test


def test_paired_sign_test_hand_computed_and_against_scipy():
    from scipy.stats import binomtest

    from dinolite.eval import paired_sign_test

    a = torch.tensor([1, 1, 1, 1, 1, 0, 1, 0], dtype=torch.bool)
    b = torch.tensor([0, 0, 0, 0, 0, 0, 1, 0], dtype=torch.bool)
    r = paired_sign_test(a, b)  # 5 queries only a got right, none only b: p = 2 / 2^5
    assert (r["a_only"], r["b_only"]) == (5, 0) and r["p_value"] == pytest.approx(0.0625)
    assert r["gap"] == pytest.approx(100 * 5 / 8)
    assert paired_sign_test(b, b)["p_value"] == 1.0  # no disagreement: no evidence either way
    assert paired_sign_test(a, b)["p_value"] == paired_sign_test(b, a)["p_value"]  # two-sided
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        x, y = torch.rand(300, generator=g) < 0.6, torch.rand(300, generator=g) < 0.5
        r = paired_sign_test(x, y)
        assert r["p_value"] == pytest.approx(binomtest(r["a_only"], r["a_only"] + r["b_only"]).pvalue, rel=1e-9)
    with pytest.raises(ValueError, match="equally long"):
        paired_sign_test(a, b[:3])
