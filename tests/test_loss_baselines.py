"""Baseline losses (rskdist/loss/baselines.py) equal pytorch-metric-learning called
directly; embedding mixup equals a hand-written mix; bad input fails with the fix;
the memory check's numbers are consistent."""

import pytest
import torch
from pytorch_metric_learning import distances, losses, miners

from rskdist.comm import gather_rows_replicated
from rskdist.loss import LOSS_NAMES, RSkLoss, check_loss_fits, loss_memory_bytes, make_loss, rsk_loss, simix_plan
from rskdist.loss.baselines import BASELINES
from rskdist.loss.memory import largest_fitting_batch

NUM_CLASSES, DIM = 6, 16
PROXY_LOSSES = ("proxy_anchor", "norm_softmax", "arcface", "cosface")


def _batch(seed=0, per_class=4, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    num = NUM_CLASSES * per_class
    emb = torch.nn.functional.normalize(torch.randn(num, DIM, generator=gen, dtype=dtype), dim=1)
    labels = (torch.arange(num) // per_class)[torch.randperm(num, generator=gen)]  # unsorted
    return emb, labels


def _pml_reference(name, **overrides):
    """PML built by hand from the paper defaults docs/loss.md states (not from our table)."""
    if name == "contrastive":
        o = {"pos_margin": 1.0, "neg_margin": 0.5, **overrides}
        return losses.ContrastiveLoss(**o, distance=distances.CosineSimilarity()), None
    if name == "multi_similarity":
        return losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5), miners.MultiSimilarityMiner(epsilon=0.1)
    if name == "triplet":
        dist = distances.LpDistance(normalize_embeddings=True, p=2, power=2)
        return (losses.TripletMarginLoss(margin=0.2, distance=dist),
                miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard", distance=dist))
    if name == "smooth_ap":
        return losses.SmoothAPLoss(temperature=0.01), None
    if name == "proxy_anchor":
        return losses.ProxyAnchorLoss(NUM_CLASSES, DIM, margin=0.1, alpha=32), None
    if name == "norm_softmax":
        return losses.NormalizedSoftmaxLoss(NUM_CLASSES, DIM, temperature=0.05), None
    if name == "cosface":
        return losses.CosFaceLoss(NUM_CLASSES, DIM, margin=0.35, scale=64), None
    assert name == "arcface"
    return losses.ArcFaceLoss(NUM_CLASSES, DIM, margin=28.6, scale=64), None


def _reference_value_and_grads(name, module, emb, labels):
    """Loss, d loss / d emb and d loss / d proxies of PML on (emb, labels), proxies copied from `module`."""
    ref, miner = _pml_reference(name)
    ref = ref.double()
    if name in PROXY_LOSSES:
        attr = "proxies" if name == "proxy_anchor" else "W"
        getattr(ref, attr).data.copy_(module.proxies.detach())
    x = emb.clone().requires_grad_(True)
    if name == "smooth_ap":  # PML reads consecutive classes: give it the batch sorted by label
        order = torch.argsort(labels, stable=True)
        feats, labs = x[order], labels[order]
    else:
        feats, labs = x, labels
    value = ref(feats, labs, None if miner is None else miner(feats, labs))
    value.backward()
    proxy_grad = None
    if name in PROXY_LOSSES:
        proxy_grad = getattr(ref, "proxies" if name == "proxy_anchor" else "W").grad
    return value.detach(), x.grad, proxy_grad


def _ours(module, emb, labels, **kw):
    x = emb.clone().requires_grad_(True)
    value = module(x, labels, **kw)
    value.backward()
    return value.detach(), x.grad, (module.proxies.grad if hasattr(module, "proxies") else None)


@pytest.mark.parametrize("name", list(BASELINES))
def test_baseline_equals_pml(name):
    torch.manual_seed(0)
    module = make_loss(name, num_classes=NUM_CLASSES, embed_dim=DIM).double()
    emb, labels = _batch(seed=1)
    value, grad, proxy_grad = _ours(module, emb, labels)
    ref_value, ref_grad, ref_proxy_grad = _reference_value_and_grads(name, module, emb, labels)
    # SmoothAPLoss accumulates its per-query AP in a float32 buffer whatever the input dtype.
    tol = 1e-6 if name == "smooth_ap" else 1e-10
    torch.testing.assert_close(value.double(), ref_value.double(), atol=tol, rtol=0)
    torch.testing.assert_close(grad, ref_grad, atol=tol, rtol=0)
    assert grad.abs().max() > 1e-4, "a zero gradient would make the comparison empty"
    if name in PROXY_LOSSES:
        torch.testing.assert_close(proxy_grad, ref_proxy_grad, atol=tol, rtol=0)
        assert proxy_grad.abs().max() > 1e-4
        assert [n for n, _ in module.named_parameters()] == ["proxies"]


def test_options_override_the_defaults():
    emb, labels = _batch(seed=2)
    ours, _, _ = _ours(make_loss("contrastive", neg_margin=0.2).double(), emb, labels)
    ref, _ = _pml_reference("contrastive", neg_margin=0.2)
    torch.testing.assert_close(ours, ref(emb, labels), atol=1e-12, rtol=0)
    default, _, _ = _ours(make_loss("contrastive").double(), emb, labels)
    assert abs(float(default) - float(ours)) > 1e-3


def test_lr_multiplier_and_float32_inputs():
    assert make_loss("proxy_anchor", num_classes=3, embed_dim=4).lr_multiplier == 100.0
    assert make_loss("arcface", num_classes=3, embed_dim=4).lr_multiplier == 1.0
    assert make_loss("rsk").lr_multiplier == 1.0
    torch.manual_seed(0)
    module = make_loss("proxy_anchor", num_classes=NUM_CLASSES, embed_dim=DIM)
    emb, labels = _batch(seed=3, dtype=torch.float32)
    value, grad, proxy_grad = _ours(module, emb.bfloat16(), labels)
    assert value.dtype == torch.float32 and grad.dtype == torch.bfloat16
    assert module.proxies.dtype == torch.float32, "the parameter keeps its dtype"
    ref_value, _, ref_proxy_grad = _reference_value_and_grads("proxy_anchor", module.double(), emb.bfloat16().double(),
                                                              labels)
    torch.testing.assert_close(value.double(), ref_value, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(proxy_grad.double(), ref_proxy_grad, atol=1e-4, rtol=1e-4)


def _mixed_by_hand(emb, labels, pairs, alphas):
    rows = []
    for (i, j), a in zip(pairs.tolist(), alphas.tolist()):
        v = a * emb[i] + (1 - a) * emb[j]
        rows.append(v / v.norm())
    return torch.cat([emb, torch.stack(rows)]), torch.cat([labels, labels[pairs[:, 0]]])


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_embedding_mixup_equals_mixing_by_hand(name):
    torch.manual_seed(0)
    module = make_loss(name, num_classes=NUM_CLASSES, embed_dim=DIM, mix="embedding").double()
    emb, labels = _batch(seed=4)
    # The loss draws its plan from the call's generator: the same draw as here.
    pairs, alphas = simix_plan(labels, generator=torch.Generator().manual_seed(5))
    value, grad, proxy_grad = _ours(module, emb, labels, generator=torch.Generator().manual_seed(5))

    x = emb.clone().requires_grad_(True)
    feats, labs = _mixed_by_hand(x, labels, pairs, alphas.double())
    assert feats.shape[0] == emb.shape[0] + 6 * NUM_CLASSES
    if name == "rsk":
        ref = rsk_loss(feats, labs)
        ref.backward()
        ref_value, ref_grad = ref.detach(), x.grad
    else:
        ref_value, grad_feats, ref_proxy_grad = _reference_value_and_grads(name, module, feats.detach(), labs)
        ref_grad = torch.autograd.grad(feats, x, grad_feats)[0]
        if name in PROXY_LOSSES:
            torch.testing.assert_close(proxy_grad, ref_proxy_grad, atol=1e-10, rtol=0)
    tol = 1e-6 if name == "smooth_ap" else 1e-10
    torch.testing.assert_close(value.double(), ref_value.double(), atol=tol, rtol=0)
    torch.testing.assert_close(grad, ref_grad, atol=tol, rtol=0)
    # The mixed rows change the loss: the comparison is not of the unmixed batch.
    unmixed, _, _ = _ours(make_loss(name, num_classes=NUM_CLASSES, embed_dim=DIM).double(), emb, labels)
    assert abs(float(unmixed) - float(value)) > 1e-6


def test_rsk_module_keeps_its_simix_form():
    emb, labels = _batch(seed=6)
    plan = simix_plan(labels, generator=torch.Generator().manual_seed(7))
    plan = (plan[0], plan[1].double())
    expected = rsk_loss(emb, labels, mix=plan)

    def seven():
        return torch.Generator().manual_seed(7)

    torch.testing.assert_close(make_loss("rsk", mix="simix")(emb, labels, generator=seven()), expected, atol=1e-12,
                               rtol=0)
    torch.testing.assert_close(RSkLoss(mix="simix")(emb, labels, generator=seven()), expected, atol=1e-12, rtol=0)
    # Two pairs per class: the loss draws simix_plan(per_class=2) from its labels.
    fewer = simix_plan(labels, per_class=2, generator=seven())
    torch.testing.assert_close(make_loss("rsk", mix="simix", mix_per_class=2)(emb, labels, generator=seven()),
                               rsk_loss(emb, labels, mix=fewer), atol=1e-12, rtol=0)
    torch.testing.assert_close(make_loss("rsk", ks=(1, 2))(emb, labels), rsk_loss(emb, labels, ks=(1, 2)),
                               atol=1e-12, rtol=0)
    for third in (plan, seven()):  # a plan or a generator where the group goes
        with pytest.raises(ValueError, match="third argument is the process group.*generator="):
            RSkLoss()(emb, labels, third)


@pytest.mark.parametrize("name", list(BASELINES))
def test_simix_is_refused_for_baselines_with_the_reason(name):
    with pytest.raises(ValueError, match="loss.mix=simix does not apply.*scalar similarities.*loss.mix=embedding"):
        make_loss(name, num_classes=3, embed_dim=4, mix="simix")


def test_bad_input_names_the_problem_and_the_fix():
    with pytest.raises(ValueError, match="not one of rsk, contrastive, multi_similarity, triplet, smooth_ap, "
                                         "proxy_anchor, norm_softmax, arcface"):
        make_loss("lifted")
    with pytest.raises(ValueError, match="loss.mix='mixup' is not one of none, embedding, simix"):
        make_loss("rsk", mix="mixup")
    with pytest.raises(ValueError, match="unknown option.*margn; valid options: alpha, margin"):
        make_loss("proxy_anchor", num_classes=3, embed_dim=4, margn=0.2)
    with pytest.raises(ValueError, match="unknown option.*margin; valid options: ks, tau1"):
        make_loss("rsk", margin=0.2)
    for name in PROXY_LOSSES:
        with pytest.raises(ValueError, match="needs num_classes"):
            make_loss(name, embed_dim=4)
        with pytest.raises(ValueError, match="needs embed_dim"):
            make_loss(name, num_classes=3)
    emb, labels = _batch()
    for name in ("contrastive", "rsk"):
        with pytest.raises(ValueError, match="third argument is the process group"):
            make_loss(name)(emb, labels, simix_plan(labels))
        # mix=none draws no plan: a generator changes nothing.
        torch.testing.assert_close(make_loss(name)(emb, labels, generator=torch.Generator().manual_seed(0)),
                                   make_loss(name)(emb, labels), atol=0, rtol=0)
    with pytest.raises(ValueError, match="simix_per_class must be a non-negative integer"):
        make_loss("rsk", mix="simix", mix_per_class=-1)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        make_loss("arcface", num_classes=3, embed_dim=DIM).double()(emb, labels)
    with pytest.raises(ValueError, match=r"same number of samples.*class sizes \[3, 4\]"):
        make_loss("smooth_ap")(emb[1:], labels[1:] if labels[0] == 0 else labels[1:])
    with pytest.raises(ValueError, match="expected embeddings"):
        make_loss("triplet")(emb, labels[:-1])


def test_gather_rows_replicated_is_the_identity_in_one_process():
    x = torch.randn(5, 3, requires_grad=True)
    assert gather_rows_replicated(x, None) is x


def test_memory_check_reports_the_numbers():
    kw = dict(embed_dim=512, num_classes=0, mix="none")
    gb80 = 80e9
    largest = largest_fitting_batch("contrastive", available_bytes=gb80, **kw)
    assert largest % 4 == 0 and largest > 0
    assert loss_memory_bytes("contrastive", largest, **kw) <= gb80 < loss_memory_bytes("contrastive", largest + 4, **kw)
    check_loss_fits("contrastive", largest, available_bytes=gb80, **kw)
    too_big = 4 * largest
    need = loss_memory_bytes("contrastive", too_big, **kw)
    with pytest.raises(ValueError) as info:
        check_loss_fits("contrastive", too_big, available_bytes=gb80, **kw)
    msg = str(info.value)
    assert f"global batch of {too_big}" in msg and f"about {need / 1e9:.1f} GB" in msg and "80.0 GB" in msg
    assert f"largest batch that fits is {largest}" in msg and "loss.name=rsk" in msg
    # Quadratic growth: twice the batch, about four times the memory (the linear part is small).
    ratio = loss_memory_bytes("contrastive", 2 * too_big, **kw) / need
    assert 3.9 < ratio <= 4.0
    # RS@k's kernel memory is linear in the batch: 65536 fits in 24 GB.
    check_loss_fits("rsk", 65536, available_bytes=24e9, **kw)
    # Embedding mixup adds the mixed rows: 4 -> 10 rows per class.
    mixed = loss_memory_bytes("contrastive", too_big, embed_dim=512, mix="embedding")
    assert mixed > 6 * need
    # Proxy losses grow with batch x classes.
    p1 = loss_memory_bytes("proxy_anchor", 4096, embed_dim=512, num_classes=10_000)
    p2 = loss_memory_bytes("proxy_anchor", 4096, embed_dim=512, num_classes=20_000)
    assert p2 > 1.5 * p1
