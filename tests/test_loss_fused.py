"""The fused RS@k block (rskdist/loss/blocks.py) and the backend table
(rskdist/loss/backends.py) against the float64 per-query reference.

- The fused formulation itself runs with the plain torch passes (rskdist/loss/reference.py,
  the Triton kernels' oracle) through a backend table built here, so every option is
  checked in seconds.
- The hand-written Triton kernels run on CPU under TRITON_INTERPRET=1, in a subprocess
  (the variable must be set before triton is imported); small batches, the interpreter
  is slow.
- The fallback rule runs on tables with broken or unavailable records.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from rskdist.loss import RSkLoss, make_loss, rsk_loss, simix_plan
from rskdist.loss import reference
from rskdist.loss.backends import BACKENDS, Backend, Backends, default_backends, eager_backend, triton_backend
from rskdist.loss.reference import rsk_loss_per_query
from rskdist.loss.rsk import RSkOptions, rsk_forward_backward
from rskdist.loss.simix import materialise_mix

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _batch(num, dim, num_classes, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(num, dim, generator=gen, dtype=dtype), dim=1)
    # Irregular classes: singletons, unsorted, uneven sizes.
    return emb, torch.randint(0, num_classes, (num,), generator=gen)


def _reference(emb, labels, mix, virtual_queries, **kw):
    """Per-query float64 reference on the batch extended with materialised SiMix samples."""
    x = emb.double().clone().requires_grad_(True)
    feats, ext_labels = x, labels
    queries = torch.ones(labels.numel(), dtype=torch.bool)
    if mix is not None:
        pairs, alphas = mix
        feats = torch.cat([x, materialise_mix(x, pairs, alphas.double())])
        ext_labels = torch.cat([labels, labels[pairs[:, 0]]])
        queries = torch.cat([queries, torch.full((pairs.shape[0],), virtual_queries)])
    loss = rsk_loss_per_query(feats, ext_labels, queries=queries, **kw)
    loss.backward()
    return loss.detach(), x.grad


def _loss_and_grad(emb, labels, **kw):
    x = emb.clone().requires_grad_(True)
    loss = rsk_loss(x, labels, **kw)
    loss.backward()
    return loss.detach(), x.grad


def torch_table() -> Backends:
    """A table whose "torch" backend is the fused block with the plain torch passes."""
    return Backends([eager_backend(), triton_backend(reference.rank_sums, reference.grad_rows, name="torch")],
                    auto={"cpu": "torch"})


@pytest.fixture
def torch_passes():
    return dict(impl="torch", backends=torch_table())


# (count_self, simix, virtual_queries, block_size, sim_cache_mb, ks/temperatures)
CASES = [
    (False, False, True, 5, 0.0, {}),
    (True, False, True, None, 256.0, {}),
    (False, True, True, 4, 0.0, {}),
    (True, True, True, 7, 256.0, {}),
    (False, True, False, 3, 256.0, {}),
    (False, False, True, 6, 0.0, dict(ks=(1, 3), tau1=0.5, tau2=0.05)),
    (False, True, True, 5, 0.0, dict(tau1="k")),  # one recall temperature per k: tau1 = k
]


@pytest.mark.parametrize("count_self,simix,virtual_queries,block_size,sim_cache_mb,hyper", CASES)
def test_fused_formulation_matches_reference(torch_passes, count_self, simix, virtual_queries, block_size,
                                             sim_cache_mb, hyper):
    emb, labels = _batch(27, 6, 7, seed=3)
    mix = simix_plan(labels, generator=torch.Generator().manual_seed(1)) if simix else None
    if mix is not None:
        mix = (mix[0], mix[1].double())
    ref_loss, ref_grad = _reference(emb, labels, mix, virtual_queries, count_self=count_self, **hyper)
    loss, grad = _loss_and_grad(emb, labels, mix=mix, count_self=count_self, block_size=block_size,
                                sim_cache_mb=sim_cache_mb, virtual_queries=virtual_queries, **torch_passes, **hyper)
    assert ref_grad.abs().max() > 1e-4  # the comparison below means something
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=0)


def assert_query_subsets_add_up(impl: str, backends: Backends | None = None):
    """Disjoint query sets (what the ranks of a distributed job pass) sum to the whole;
    returns the batch, its plan and the whole (loss, gradient) for further checks."""
    emb, labels = _batch(30, 6, 6, seed=5)
    pairs, alphas = simix_plan(labels, generator=torch.Generator().manual_seed(2))
    kw = dict(opts=RSkOptions(), pairs=pairs, alphas=alphas.double(), block_size=4, impl=impl, backends=backends)
    whole, grad_whole = rsk_forward_backward(emb, labels, **kw)
    num = labels.numel() + pairs.shape[0]
    parts = [rsk_forward_backward(emb, labels, queries=idx, **kw) for idx in
             (torch.arange(0, 11), torch.arange(11, 30), torch.arange(30, num))]
    torch.testing.assert_close(sum(p[0] for p in parts), whole, atol=1e-12, rtol=0)
    torch.testing.assert_close(sum(p[1] for p in parts), grad_whole, atol=1e-12, rtol=0)
    return emb, labels, kw, whole, grad_whole


def test_fused_query_subsets_add_up(torch_passes):
    assert_query_subsets_add_up(**torch_passes)


def test_fused_float32_within_float32_tolerance(torch_passes):
    emb, labels = _batch(40, 8, 9, seed=6)
    ref_loss, ref_grad = _reference(emb, labels, None, True)
    loss, grad = _loss_and_grad(emb.float(), labels, block_size=7, **torch_passes)
    torch.testing.assert_close(loss.double(), ref_loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-4 * float(ref_grad.abs().max()), rtol=0)


def test_bad_impl_is_a_clear_error():
    emb, labels = _batch(8, 4, 3, seed=0)
    with pytest.raises(ValueError, match="impl='fast' is not a loss backend; the available ones are auto, eager, "
                                         "native, triton"):
        rsk_loss(emb, labels, impl="fast")
    with pytest.raises(ValueError, match="impl='cuda' is not a loss backend"):
        RSkLoss(impl="cuda")
    # The torch.compile backend is gone: a config asking for it (loss.options.impl) is told what there is.
    with pytest.raises(ValueError, match="impl='compiled' is not a loss backend; the available ones are auto, "
                                         "eager, native, triton"):
        make_loss("rsk", impl="compiled")
    from rskdist.build import build_criterion
    from rskdist.config import load_config

    cfg = load_config(None, ["loss.options={impl: compiled}"])
    with pytest.raises(ValueError, match="impl='compiled' is not a loss backend; the available ones are auto"):
        build_criterion(cfg.loss)


def test_unavailable_backend_falls_back_with_a_note(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    table = default_backends()
    emb, labels = _batch(20, 5, 5, seed=1)
    ref = _loss_and_grad(emb, labels, impl="eager")
    with pytest.warns(RuntimeWarning, match=r"impl='triton' is unavailable on cpu .*needs CUDA.*using the eager"):
        got = _loss_and_grad(emb, labels, impl="triton", backends=table)
    torch.testing.assert_close(got, ref, atol=0, rtol=0)
    assert table.resolve("auto", torch.device("cpu")) in ("eager", "native")
    assert table.resolve("auto", torch.device("meta")) == "eager"  # no auto choice for the device type
    assert BACKENDS.noted.isdisjoint(table.noted), "a table built by a test keeps its own state"


def test_backend_failing_on_first_call_falls_back():
    def broken(*args):
        raise RuntimeError("C compile failed: no such compiler\nmore lines")

    table = Backends([eager_backend(), triton_backend(broken, broken, name="broken")], auto={})
    emb, labels = _batch(24, 5, 6, seed=2)
    pairs, alphas = simix_plan(labels, generator=torch.Generator().manual_seed(0))
    kw = dict(mix=(pairs, alphas.double()), block_size=50)  # a fused-size block: the fallback splits it
    ref = _loss_and_grad(emb, labels, impl="eager", **kw)
    with pytest.warns(RuntimeWarning, match="impl='broken' failed on cpu .*C compile failed.*eager kernel"):
        got = _loss_and_grad(emb, labels, impl="broken", backends=table, **kw)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)
    assert ("broken", "cpu") in table.failed
    with pytest.warns(RuntimeWarning, match="impl='broken' is unavailable .*failed on its first call"):
        assert table.resolve("broken", torch.device("cpu")) == "eager"  # and stays on eager in this process


def test_errors_after_a_first_success_are_raised():
    calls = []

    def flaky(t_qx, t_qp, pos, q, count_self):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("a real error in a later call")
        return reference.rank_sums(t_qx, t_qp, pos, q, count_self)

    table = Backends([eager_backend(), triton_backend(flaky, reference.grad_rows, name="flaky")], auto={})
    emb, labels = _batch(24, 5, 6, seed=2)
    _loss_and_grad(emb, labels, impl="flaky", backends=table, block_size=50)
    with pytest.raises(RuntimeError, match="a real error"):
        _loss_and_grad(emb, labels, impl="flaky", backends=table, block_size=50)


def test_block_sizes_come_from_the_record():
    record = Backend("t", why_not=lambda device: None, make_block=lambda: None,
                     block_elems={"cpu": 1000, "cuda": 8000}, buffers=1)
    assert record.default_rows("cpu", 100, 3) == 10 and record.default_rows("cuda", 100, 3) == 80
    assert record.default_rows("mps", 100, 3) == 10  # other device types take the CPU size
    per_positive = Backend("e", why_not=lambda device: None, make_block=lambda: None, block_elems={"cpu": 1000},
                           buffers=1, per_positive=True)
    assert per_positive.default_rows("cpu", 100, 3) == 3 and per_positive.default_rows("cpu", 5000, 3) == 1


# The Triton kernels under the interpreter: computed in a child process, compared here.
_TRITON_CHILD = textwrap.dedent("""
    import json, sys, torch
    from rskdist.loss import rsk_loss
    from rskdist.loss.backends import BACKENDS
    from rskdist.loss.rsk import RSkOptions, rsk_forward_backward
    assert BACKENDS.resolve("triton", torch.device("cpu")) == "triton"
    cases, out = json.loads(sys.argv[1]), {}
    data = torch.load(sys.argv[2])
    for name, kw in cases.items():
        emb = data["emb"].to(getattr(torch, kw.pop("dtype")))
        mix = data["mix"] if kw.pop("simix") else None
        if "queries" in kw:
            q = torch.tensor(kw.pop("queries"))
            loss, grad = rsk_forward_backward(emb, data["labels"], opts=RSkOptions(**kw.pop("opts", {})),
                                                 pairs=mix[0], alphas=mix[1].to(emb.dtype), queries=q,
                                                 impl="triton", **kw)
        else:
            x = emb.clone().requires_grad_(True)
            loss = rsk_loss(x, data["labels"], mix=mix, impl="triton", **kw)
            loss.backward()
            grad = x.grad
        out[name] = (loss.detach(), grad)
    torch.save(out, sys.argv[3])
""")

TRITON_CASES = {
    "stream": dict(dtype="float64", simix=False, block_size=5, sim_cache_mb=0.0),
    "count_self_dense": dict(dtype="float64", simix=False, count_self=True, block_size=16),
    "simix": dict(dtype="float64", simix=True, block_size=9),
    "simix_db_only": dict(dtype="float64", simix=True, virtual_queries=False, tau2=0.05, ks=[1, 3]),
    "float32": dict(dtype="float32", simix=True),
    "query_subset": dict(dtype="float64", simix=True, queries=[1, 4, 5, 13, 17, 19, 22], block_size=4),
    "tau1_per_k": dict(dtype="float64", simix=True, block_size=5, tau1="k"),
}


FAST_TRITON_CASES = ("stream", "simix", "float32", "tau1_per_k")


@pytest.mark.parametrize("names", [
    FAST_TRITON_CASES,
    pytest.param(tuple(n for n in TRITON_CASES if n not in FAST_TRITON_CASES), marks=pytest.mark.slow),
], ids=["fast", "rest"])
def test_triton_kernel_interpreted_matches_reference(tmp_path, names):
    pytest.importorskip("triton")
    cases = {name: TRITON_CASES[name] for name in names}
    emb, labels = _batch(16, 5, 5, seed=4)
    pairs, alphas = simix_plan(labels, per_class=2, generator=torch.Generator().manual_seed(3))
    torch.save({"emb": emb, "labels": labels, "mix": (pairs, alphas.double())}, tmp_path / "in.pt")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", _TRITON_CHILD, json.dumps(cases), str(tmp_path / "in.pt"),
                           str(tmp_path / "out.pt")], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    for name, case in cases.items():
        kw = {k: v for k, v in case.items() if k not in ("dtype", "simix", "block_size", "sim_cache_mb")}
        mix = (pairs, alphas.double()) if case["simix"] else None
        loss, grad = out[name]
        if name == "query_subset":
            ref, ref_grad = rsk_forward_backward(emb, labels, opts=RSkOptions(), pairs=pairs,
                                                    alphas=alphas.double(), queries=torch.tensor(kw["queries"]),
                                                    impl="eager")
        else:
            ref, ref_grad = _reference(emb, labels, mix, kw.pop("virtual_queries", True), **kw)
        tol = 1e-6 if case["dtype"] == "float64" else 1e-5
        assert ref_grad.abs().max() > 1e-4, name
        torch.testing.assert_close(loss.double(), ref, atol=tol, rtol=0, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(grad.double(), ref_grad, atol=tol * max(1.0, 10 * float(ref_grad.abs().max())),
                                   rtol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_on_cuda_matches_reference(dtype):
    impl, table = "triton", default_backends()
    emb, labels = _batch(300, 32, 60, seed=15)
    pairs, alphas = simix_plan(labels, generator=torch.Generator().manual_seed(4))
    ref_loss, ref_grad = rsk_forward_backward(emb, labels, opts=RSkOptions(count_self=True), pairs=pairs,
                                                 alphas=alphas.double(), impl="eager")
    loss, grad = rsk_forward_backward(emb.cuda().to(dtype), labels.cuda(), opts=RSkOptions(count_self=True),
                                         pairs=pairs.cuda(), alphas=alphas.cuda(), block_size=37, impl=impl,
                                         backends=table)
    assert (impl, "cuda") not in table.failed, f"{impl} fell back to eager"
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(loss.cpu().double(), ref_loss, atol=tol, rtol=0)
    torch.testing.assert_close(grad.cpu().double(), ref_grad, atol=tol * 100 * float(ref_grad.abs().max()), rtol=0)
