"""RS@k blockwise kernel against the plain per-query reference (float64)."""

import pytest
import torch

from rskdist.loss import RSkLoss, rsk_loss, simix_plan
from rskdist.loss.reference import rsk_loss_dense, rsk_loss_per_query
from rskdist.loss.simix import materialise_mix


def _batch(num, dim, num_classes, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(num, dim, generator=gen, dtype=dtype), dim=1)
    # Irregular classes: sizes from 1 (singletons) upwards, unsorted.
    labels = torch.randint(0, num_classes, (num,), generator=gen)
    return emb, labels


def _value_and_grad(fn, emb, *args, **kwargs):
    x = emb.clone().requires_grad_(True)
    loss = fn(x, *args, **kwargs)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("count_self", [False, True])
@pytest.mark.parametrize("block_size", [1, 3, 7, None])
@pytest.mark.parametrize("sim_cache_mb", [0.0, 256.0], ids=["stream", "dense"])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_per_query_reference(count_self, block_size, sim_cache_mb, seed):
    emb, labels = _batch(29, 6, 7, seed)
    ref_loss, ref_grad = _value_and_grad(rsk_loss_per_query, emb, labels, count_self=count_self)
    loss, grad = _value_and_grad(
        rsk_loss, emb, labels, count_self=count_self, block_size=block_size, sim_cache_mb=sim_cache_mb
    )
    assert ref_grad.abs().max() > 1e-4  # the comparison below means something
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize("ks,tau1,tau2", [((1, 2, 4, 8, 16), 1.0, 0.01), ((1, 3), 0.5, 0.05), (5, 2.0, 0.1),
                                         ((1, 2, 4, 8, 16), "k", 0.01)])
def test_other_hyperparameters(ks, tau1, tau2):
    emb, labels = _batch(31, 5, 5, seed=3)
    kw = dict(ks=(ks,) if isinstance(ks, int) else ks, tau1=tau1, tau2=tau2)
    ref_loss, ref_grad = _value_and_grad(rsk_loss_per_query, emb, labels, **kw)
    loss, grad = _value_and_grad(rsk_loss, emb, labels, block_size=4, ks=ks, tau1=tau1, tau2=tau2)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize("impl", ["eager", "native"])
def test_tau1_per_k_is_one_temperature_per_k(impl):
    """tau1="k": the loss is linear in the per-k terms, so with ks = (1, 4) it is the mean of the
    loss at k = 1 with tau1 = 1 and at k = 4 with tau1 = 4 (value and gradient)."""
    emb, labels = _batch(40, 4, 6, seed=8)
    emb = torch.nn.functional.normalize(emb + 0.8 * emb[labels], dim=1)  # classes apart: ranks near k matter
    both = _value_and_grad(rsk_loss, emb, labels, ks=(1, 4), tau1="k", impl=impl)
    one = _value_and_grad(rsk_loss, emb, labels, ks=(1,), tau1=1.0, impl=impl)
    four = _value_and_grad(rsk_loss, emb, labels, ks=(4,), tau1=4.0, impl=impl)
    torch.testing.assert_close(both[0], (one[0] + four[0]) / 2, atol=1e-9, rtol=0)
    torch.testing.assert_close(both[1], (one[1] + four[1]) / 2, atol=1e-9, rtol=0)
    same_tau = _value_and_grad(rsk_loss, emb, labels, ks=(1, 4), tau1=1.0, impl=impl)
    assert abs(float(same_tau[0] - both[0])) > 1e-3  # "k" is not read as one temperature
    dense = _value_and_grad(rsk_loss_dense, emb, labels, ks=(1, 4), tau1="k")
    torch.testing.assert_close(both[0], dense[0], atol=1e-9, rtol=0)
    with pytest.raises(ValueError, match="tau1 may also be 'k'"):
        rsk_loss(emb, labels, tau1="K")


def test_count_self_raises_ranks():
    """The published behaviour ranks every positive about one place lower: higher loss."""
    emb, labels = _batch(40, 8, 6, seed=4)
    assert rsk_loss(emb, labels, count_self=True) > rsk_loss(emb, labels) + 1e-3


def test_dense_reference_agrees_on_larger_batch():
    emb, labels = _batch(300, 16, 60, seed=5)
    ref_loss, ref_grad = _value_and_grad(rsk_loss_dense, emb, labels)
    for cache in (0.0, 256.0):
        loss, grad = _value_and_grad(rsk_loss, emb, labels, block_size=37, sim_cache_mb=cache)
        torch.testing.assert_close(loss, ref_loss, atol=1e-9, rtol=0)
        torch.testing.assert_close(grad, ref_grad, atol=1e-9, rtol=0)


def test_permutation_equivariance():
    emb, labels = _batch(50, 8, 9, seed=6)
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(0))
    loss, grad = _value_and_grad(rsk_loss, emb, labels, block_size=8)
    loss_p, grad_p = _value_and_grad(rsk_loss, emb[perm], labels[perm], block_size=8)
    torch.testing.assert_close(loss_p, loss, atol=1e-12, rtol=0)
    torch.testing.assert_close(grad_p, grad[perm], atol=1e-12, rtol=0)


@pytest.mark.parametrize("virtual_queries", [True, False])
@pytest.mark.parametrize("sim_cache_mb", [0.0, 256.0], ids=["stream", "dense"])
@pytest.mark.parametrize("per_class", [None, 2])
def test_simix_equals_materialised_batch(virtual_queries, sim_cache_mb, per_class):
    emb, labels = _batch(26, 6, 6, seed=7)
    pairs, alphas = simix_plan(labels, per_class=per_class, generator=torch.Generator().manual_seed(1))
    assert pairs.shape[0] > 0
    alphas = alphas.double()

    def extended_reference(x):
        feats = torch.cat([x, materialise_mix(x, pairs, alphas)])
        ext_labels = torch.cat([labels, labels[pairs[:, 0]]])
        queries = torch.ones(ext_labels.numel(), dtype=torch.bool)
        queries[labels.numel():] = virtual_queries
        return rsk_loss_per_query(feats, ext_labels, queries=queries)

    ref_loss, ref_grad = _value_and_grad(extended_reference, emb)
    loss, grad = _value_and_grad(
        rsk_loss, emb, labels, mix=(pairs, alphas), block_size=5,
        virtual_queries=virtual_queries, sim_cache_mb=sim_cache_mb,
    )
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=0)


def test_simix_plan_all_pairs():
    labels = torch.tensor([3, 1, 3, 3, 1, 7, 3, 1, 1, 9])  # class 9 and 7 are singletons
    pairs, alphas = simix_plan(labels, generator=torch.Generator().manual_seed(0))
    assert pairs.shape == (12, 2)  # 6 pairs for each class of 4
    assert (labels[pairs[:, 0]] == labels[pairs[:, 1]]).all()
    assert (pairs[:, 0] < pairs[:, 1]).all()
    assert len({tuple(p) for p in pairs.tolist()}) == 12
    assert ((alphas >= 0) & (alphas < 1)).all() and alphas.std() > 0
    again = simix_plan(labels, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again[0], pairs) and torch.equal(again[1], alphas)


def test_simix_plan_per_class_and_empty():
    labels = torch.arange(40) // 5  # 8 classes of 5: 10 pairs each
    pairs, _ = simix_plan(labels, per_class=3, generator=torch.Generator().manual_seed(0))
    assert pairs.shape == (24, 2)
    assert torch.bincount(labels[pairs[:, 0]]).tolist() == [3] * 8
    pairs, alphas = simix_plan(torch.arange(5))
    assert pairs.shape == (0, 2) and alphas.shape == (0,)


def test_low_precision_inputs_computed_in_fp32():
    emb, labels = _batch(64, 16, 12, seed=8, dtype=torch.float32)
    emb_bf16 = emb.to(torch.bfloat16)
    x = emb_bf16.clone().requires_grad_(True)
    loss = rsk_loss(x, labels)
    loss.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    ref_loss, ref_grad = _value_and_grad(rsk_loss_per_query, emb_bf16.double(), labels)
    torch.testing.assert_close(loss.double(), ref_loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(x.grad.double(), ref_grad, atol=2e-2 * ref_grad.abs().max().item(), rtol=0)


@pytest.mark.parametrize("scale", [2.0**10, 2.0**16])
def test_fp16_gradient_is_scaled_before_it_is_rounded(scale):
    """A loss-scaled backward (fp16 training) must round grad * scale to fp16 once: rounded
    first, many entries are below fp16's normal range (6.1e-5) and lose their digits or
    flush to zero; and 2^16 (DeepSpeed's initial scale) is itself inf in fp16."""
    emb, labels = _batch(256, 16, 64, seed=4, dtype=torch.float32)
    emb16 = emb.half()
    _, ref_grad = _value_and_grad(rsk_loss, emb16.float(), labels)
    tiny = (ref_grad != 0) & (ref_grad.abs() < torch.finfo(torch.float16).tiny)
    assert tiny.float().mean() > 0.2  # the case this test is about is common here
    x = emb16.clone().requires_grad_(True)
    (rsk_loss(x, labels) * scale).backward()
    assert x.grad.dtype == torch.float16
    expected = (ref_grad * scale).half()  # one rounding, of the scaled fp32 gradient
    torch.testing.assert_close(x.grad, expected, atol=0, rtol=0)


def test_no_positives_gives_zero_loss_and_grad():
    emb, _ = _batch(6, 4, 1, seed=9)
    loss, grad = _value_and_grad(rsk_loss, emb, torch.arange(6))
    assert float(loss) == 0.0 and torch.count_nonzero(grad) == 0


def test_module_matches_function():
    emb, labels = _batch(33, 8, 8, seed=10)
    module = RSkLoss(ks=(1, 4), block_size=6)
    torch.testing.assert_close(module(emb, labels), rsk_loss(emb, labels, ks=(1, 4)), atol=1e-12, rtol=0)
    assert "block_size=6" in repr(module)


def test_no_grad_forward_skips_gradient_work():
    emb, labels = _batch(20, 4, 4, seed=11)
    with torch.no_grad():
        value = rsk_loss(emb, labels)
    torch.testing.assert_close(value, rsk_loss_per_query(emb, labels), atol=1e-9, rtol=0)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda e, y: (e, y[:-1]), "embeddings but"),
        (lambda e, y: (e[0], y), "must be 2-D"),
        (lambda e, y: (e, y[:, None]), "must be 1-D"),
        (lambda e, y: (e[:0], y[:0]), "empty batch"),
        (lambda e, y: (e.index_fill(0, torch.tensor([2]), float("nan")), y), "NaN or Inf"),
        (lambda e, y: (e, y.float()), "labels must be integers"),
        (lambda e, y: (e.long(), y), "floating point"),
    ],
)
def test_bad_input_is_a_clear_error(make, match):
    emb, labels = _batch(10, 4, 3, seed=12)
    bad_emb, bad_labels = make(emb, labels)
    with pytest.raises(ValueError, match=match):
        rsk_loss(bad_emb, bad_labels)


def test_bad_options_and_mix_are_clear_errors():
    emb, labels = _batch(10, 4, 3, seed=13)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1, 2, 0])
    with pytest.raises(ValueError, match="ks must be"):
        rsk_loss(emb, labels, ks=(0, 2))
    with pytest.raises(ValueError, match="tau1 and tau2"):
        rsk_loss(emb, labels, tau2=0.0)
    with pytest.raises(ValueError, match="same class"):
        rsk_loss(emb, labels, mix=(torch.tensor([[0, 2]]), torch.tensor([0.5])))
    with pytest.raises(ValueError, match="outside the batch"):
        rsk_loss(emb, labels, mix=(torch.tensor([[0, 10]]), torch.tensor([0.5])))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        rsk_loss(emb, labels, mix=(torch.tensor([[0, 1]]), torch.tensor([1.5])))
    with pytest.raises(ValueError, match="block_size"):
        rsk_loss(emb, labels, block_size=0)
    with pytest.raises(ValueError, match="ks must be"):
        RSkLoss(ks=())


@pytest.mark.parametrize("impl", ["eager", "native"])
@pytest.mark.parametrize("panel_elems", [1, 90, 400])
def test_stream_panels_of_several_blocks(panel_elems, impl):
    """Panels (one similarity product per group of blocks, whole classes where they fit:
    panel_elems 1 and 90 split the classes of ~5, 400 holds them) give the dense result,
    for the whole batch and for query subsets (a distributed rank's share)."""
    import rskdist.loss.rsk as rsk

    emb, labels = _batch(30, 6, 6, seed=14)
    pairs, alphas = simix_plan(labels, generator=torch.Generator().manual_seed(2))
    mix = (pairs, alphas.double())
    ref_loss, ref_grad = _value_and_grad(rsk_loss, emb, labels, mix=mix, block_size=30, sim_cache_mb=256.0)
    kw = dict(opts=rsk.RSkOptions(), pairs=pairs, alphas=alphas.double(), block_size=2, impl=impl,
              panel_elems=panel_elems)
    loss, grad = rsk.rsk_forward_backward(emb, labels, sim_cache_mb=0.0, **kw)  # the stream source
    torch.testing.assert_close(loss, ref_loss, atol=1e-12, rtol=0)
    torch.testing.assert_close(grad, ref_grad, atol=1e-12, rtol=0)

    num = labels.numel() + pairs.shape[0]
    shares = (torch.cat([torch.arange(0, 13), torch.arange(30, 30 + (num - 30) // 2)]),
              torch.cat([torch.arange(13, 30), torch.arange(30 + (num - 30) // 2, num)]))
    parts = [rsk.rsk_forward_backward(emb, labels, queries=share, **kw) for share in shares]
    torch.testing.assert_close(sum(p[0] for p in parts), ref_loss, atol=1e-12, rtol=0)  # parts are pre-scaled
    torch.testing.assert_close(sum(p[1] for p in parts), ref_grad, atol=1e-12, rtol=0)

    items = rsk._ExtendedItems(labels, pairs, alphas.double(), torch.float64)
    mine = torch.nonzero(items.is_query(True)).flatten()
    panels = rsk._Panel.by_class(items, mine, max(2, panel_elems // 30))
    assert sum(p.num_virtual_queries for p in panels) == pairs.shape[0]
    if panel_elems == 400:  # whole classes: every real row once, virtual queries cost no extra row
        assert sum(p.ids.numel() for p in panels) == int((torch.bincount(labels)[labels] >= 2).sum())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(dtype):
    emb, labels = _batch(300, 32, 60, seed=15, dtype=torch.float32)
    pairs, alphas = simix_plan(labels, generator=torch.Generator().manual_seed(4))
    emb = emb.to(dtype)
    ref_loss, ref_grad = _value_and_grad(rsk_loss, emb.double(), labels, mix=(pairs, alphas.double()))
    loss, grad = _value_and_grad(rsk_loss, emb.cuda(), labels.cuda(), mix=(pairs, alphas), block_size=37)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(loss.cpu().double(), ref_loss, atol=tol, rtol=0)
    torch.testing.assert_close(grad.cpu().double(), ref_grad, atol=tol * 100 * float(ref_grad.abs().max()), rtol=0)
