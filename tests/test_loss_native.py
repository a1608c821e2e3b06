"""The native C kernel (impl="native", rskdist/loss/native.py) against the float64 references.

It is built once per test module into a fresh cache (about a second), so these tests
also check the build itself; the build's own failure modes are tested with private
kernels (`NativeKernel` with its own cache, flags or compiler) in tables of their own.
"""

import ctypes

import pytest
import torch

from rskdist.loss import native, simix_plan
from rskdist.loss.backends import Backends, eager_backend, native_backend
from rskdist.loss.rsk import RSkOptions, _ExtendedItems, rsk_forward_backward
from test_loss_fused import CASES, _batch, _reference, assert_query_subsets_add_up
from test_loss_fused import _loss_and_grad as _any_loss_and_grad

pytestmark = pytest.mark.skipif(native.find_compiler() is None, reason="no C compiler")


def _table(kernel: native.NativeKernel) -> Backends:
    return Backends([eager_backend(), native_backend(kernel)], auto={"cpu": "native"})


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """The kernel built into an empty cache for this module."""
    built = native.NativeKernel(cache=tmp_path_factory.mktemp("kernels"))
    built.load()
    return built


@pytest.fixture
def table(kernel):
    """Each test sees the kernel's own outcome, not an earlier test's fallback: a fresh table."""
    return _table(kernel)


@pytest.fixture
def _loss_and_grad(table):
    return lambda emb, labels, **kw: _any_loss_and_grad(emb, labels, backends=table, **kw)


@pytest.mark.parametrize("count_self,simix,virtual_queries,block_size,sim_cache_mb,hyper", CASES)
def test_native_matches_float64_reference(table, _loss_and_grad, count_self, simix, virtual_queries, block_size,
                                          sim_cache_mb, hyper):
    emb, labels = _batch(27, 6, 7, seed=3)  # singletons, uneven classes
    mix = simix_plan(labels, generator=torch.Generator().manual_seed(1)) if simix else None
    if mix is not None:
        mix = (mix[0], mix[1].double())
    ref_loss, ref_grad = _reference(emb, labels, mix, virtual_queries, count_self=count_self, **hyper)
    loss, grad = _loss_and_grad(emb, labels, mix=mix, count_self=count_self, block_size=block_size,
                                sim_cache_mb=sim_cache_mb, virtual_queries=virtual_queries, impl="native", **hyper)
    assert ("native", "cpu") not in table.failed, "the native kernel fell back to eager"
    assert ref_grad.abs().max() > 1e-4  # the comparison below means something
    torch.testing.assert_close(loss, ref_loss, atol=1e-9, rtol=0)
    torch.testing.assert_close(grad, ref_grad, atol=1e-9, rtol=0)


# Batches the polynomial exp and the clamp must survive: collapsed embeddings (every
# difference near 0), a small tau2 (differences of +-2000, far past the clamp at 80), and
# a plain trained-like batch.
SPREADS = {
    "collapsed": dict(noise=1e-3, tau2=0.01, num=16),  # few items: ranks ~N/2 stay within reach of k
    "clamped": dict(noise=1.0, tau2=0.001, num=60),
    "plain": dict(noise=1.0, tau2=0.01, num=60),
}


@pytest.mark.parametrize("spread", SPREADS)
def test_native_float32_within_float32_tolerance(table, _loss_and_grad, spread):
    case = SPREADS[spread]
    gen = torch.Generator().manual_seed(8)
    centre = torch.randn(1, 16, generator=gen, dtype=torch.float64)
    noise = case["noise"] * torch.randn(case["num"], 16, generator=gen, dtype=torch.float64)
    emb = torch.nn.functional.normalize(centre + noise, dim=1)
    labels = torch.randint(0, case["num"] // 4, (case["num"],), generator=gen)
    pairs, alphas = simix_plan(labels, per_class=1, generator=torch.Generator().manual_seed(2))
    mix = (pairs, alphas.double())
    ref_loss, ref_grad = _reference(emb, labels, mix, True, tau2=case["tau2"])
    loss, grad = _loss_and_grad(emb.float(), labels, mix=mix, tau2=case["tau2"], block_size=11, impl="native")
    assert ("native", "cpu") not in table.failed
    assert torch.isfinite(grad).all()
    assert ref_grad.abs().max() > 1e-3, "a batch whose gradient vanishes tests nothing"
    torch.testing.assert_close(loss.double(), ref_loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-4 * float(ref_grad.abs().max()), rtol=0)


def _fan(dtype):
    """Points on a circle: class 0 fanned out over 170 degrees, so one query's positives have
    similarities from 1 to -0.98 (t spread ~200 at tau2 = 0.01: several groups of positives,
    and items clamped for one group but not another), the other classes scattered."""
    gen = torch.Generator().manual_seed(5)
    angles = torch.cat([torch.tensor([0.0, 0.7, 1.4, 2.1, 2.97]), 6.28 * torch.rand(25, generator=gen)])
    emb = torch.stack([angles.cos(), angles.sin()], 1).to(dtype)
    labels = torch.cat([torch.zeros(5, dtype=torch.long), torch.randint(1, 7, (25,), generator=gen)])
    return emb, labels, simix_plan(labels, generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("count_self", [False, True])
def test_positives_far_apart_use_several_groups_exactly(table, _loss_and_grad, count_self):
    emb, labels, (pairs, alphas) = _fan(torch.float64)
    mix = (pairs, alphas.double())
    ref_loss, ref_grad = _reference(emb, labels, mix, True, count_self=count_self)
    loss, grad = _loss_and_grad(emb, labels, mix=mix, count_self=count_self, block_size=4, impl="native")
    assert ("native", "cpu") not in table.failed
    assert ref_grad[:5].abs().max() > 1e-3  # the fanned class has a gradient to get right
    torch.testing.assert_close(loss, ref_loss, atol=1e-9, rtol=0)
    torch.testing.assert_close(grad, ref_grad, atol=1e-9, rtol=0)
    loss32, grad32 = _loss_and_grad(emb.float(), labels, mix=mix, count_self=count_self, block_size=4,
                                    impl="native")
    torch.testing.assert_close(loss32.double(), ref_loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(grad32.double(), ref_grad, atol=1e-4 * float(ref_grad.abs().max()), rtol=0)


def test_native_query_subsets_add_up(table):
    """Query subsets (the distributed path) add up to the whole, which equals eager's."""
    emb, labels, kw, whole, grad_whole = assert_query_subsets_add_up("native", table)
    assert ("native", "cpu", False, torch.float64) in table.proven  # it ran, no fallback
    eager, grad_eager = rsk_forward_backward(emb, labels, **{**kw, "impl": "eager"})
    torch.testing.assert_close(whole, eager, atol=1e-12, rtol=0)
    torch.testing.assert_close(grad_whole, grad_eager, atol=1e-12, rtol=0)


def test_native_result_does_not_depend_on_threads(_loss_and_grad):
    emb, labels = _batch(90, 8, 20, seed=9)
    mix = simix_plan(labels, generator=torch.Generator().manual_seed(3))
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(_loss_and_grad(emb.float(), labels, mix=mix, impl="native", block_size=50))
    finally:
        torch.set_num_threads(threads)
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], atol=1e-6, rtol=0)  # only the order of the sum differs
        assert torch.equal(grad, results[0][1])  # rows are computed alone, whatever the split


def test_no_loss_only_pass_gradient(table):
    emb, labels = _batch(40, 6, 8, seed=4)
    loss, grad = rsk_forward_backward(emb, labels, opts=RSkOptions(), need_grad=False, impl="native",
                                         backends=table)
    assert ("native", "cpu") not in table.failed
    ref, _ = rsk_forward_backward(emb, labels, opts=RSkOptions(), need_grad=False, impl="eager")
    assert grad is None
    torch.testing.assert_close(loss, ref, atol=1e-12, rtol=0)


def test_build_is_cached_keyed_and_bounded(tmp_path):
    cache = tmp_path / "cache"
    first = native.NativeKernel(cache=cache)
    path = first.library_path()
    assert path.parent == cache and not path.exists()
    first.load()
    assert path.exists() and [p.name for p in cache.iterdir()] == [path.name]  # no temporary left
    stamp = path.stat().st_mtime_ns
    native.NativeKernel(cache=cache).load()
    assert path.stat().st_mtime_ns == stamp  # loaded, not rebuilt
    # Other flags, other file; the cache keeps the newest KEEP_BUILDS kernels.
    paths = [path]
    for n in range(native.KEEP_BUILDS + 1):
        other = native.NativeKernel(cache=cache, flags=native.FLAGS + (f"-DRSK_TEST_FLAG={n}",))
        assert other.library_path() not in paths
        other.load()
        paths.append(other.library_path())
    kept = sorted(p.name for p in cache.iterdir())
    assert kept == sorted(p.name for p in paths[-native.KEEP_BUILDS:]), "the oldest builds are dropped"
    # A kernel pruned by another process between its build and its load is built again.
    # (A kernel this process has not loaded yet: dlopen would hand back a loaded one by name.)
    lost, builds = native.NativeKernel(cache=cache, flags=native.FLAGS + ("-DRSK_TEST_FLAG=lost",)), []
    path = lost.library_path()

    def build_then_lose_it_once(target, real=lost.build):
        real(target)
        builds.append(target)
        if len(builds) == 1:
            target.unlink()  # what a prune by another process looks like from here

    lost.build = build_then_lose_it_once
    lost.load()
    assert builds == [path, path] and path.exists()


def test_unwritable_cache_builds_in_a_private_temporary(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("not a directory")  # unwritable even for root
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(native.tempfile, "tempdir", None)  # tempfile caches the folder it found first
    native.NativeKernel(cache=tmp_path / "a_file" / "kernels").load()
    assert list((tmp_path / "tmp").glob("rskdist-kernels-*/rsk_rows-*.so"))


def test_default_cache_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("RSKDIST_KERNEL_CACHE", str(tmp_path / "k"))
    assert native.NativeKernel().cache == tmp_path / "k"
    monkeypatch.delenv("RSKDIST_KERNEL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert native.NativeKernel().cache == tmp_path / "xdg" / "rskdist" / "kernels"


def test_no_compiler_means_eager_with_a_note():
    table = _table(native.NativeKernel(cc=""))
    assert table.resolve("auto", torch.device("cpu")) == "eager"  # auto says nothing
    emb, labels = _batch(20, 5, 5, seed=1)
    ref = _any_loss_and_grad(emb, labels, impl="eager")
    with pytest.warns(RuntimeWarning, match=r"impl='native' is unavailable on cpu \(no C compiler.*using the eager"):
        got = _any_loss_and_grad(emb, labels, impl="native", backends=table)
    torch.testing.assert_close(got, ref, atol=0, rtol=0)


def test_failed_build_falls_back_to_eager(tmp_path):
    broken = native.NativeKernel(cache=tmp_path, flags=native.FLAGS + ("-DRSK_TEST_FLAG", "--no-such-flag"))
    table = _table(broken)
    emb, labels = _batch(24, 5, 6, seed=2)
    ref = _any_loss_and_grad(emb, labels, impl="eager", block_size=50)
    with pytest.warns(RuntimeWarning, match=r"impl='native' failed on cpu \(RuntimeError: C compile failed"):
        got = _any_loss_and_grad(emb, labels, impl="native", block_size=50, backends=table)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)
    assert not list(tmp_path.iterdir())  # the failed build left nothing behind


def test_native_is_a_cpu_kernel():
    assert "CPU kernel" in _table(native.NativeKernel()).why_not("native", torch.device("meta"))


def test_failed_allocation_is_a_memory_error(kernel):
    """The kernel returns an error code when it cannot allocate its scratch (not a NaN,
    which -ffinite-math-only may fold away); the caller raises MemoryError."""
    lib = kernel.load()
    args = native._Args(n_real=1 << 50, n_virtual=0, width=1)  # scratch rows of 4 PB: malloc fails
    loss = ctypes.c_double(0.0)
    assert lib.rsk_rows_f32(ctypes.byref(args), 0, 0, ctypes.byref(loss)) == native.RSK_ENOMEM

    class Refusing:  # a library whose kernel reports a failed allocation
        rsk_rows_f32 = rsk_rows_f64 = staticmethod(lambda *a: native.RSK_ENOMEM)

    emb, labels = _batch(12, 4, 3, seed=0)
    items = _ExtendedItems(labels, None, None, torch.float32)
    sim = (emb @ emb.T).float()
    q = torch.nonzero(items.is_query(True)).flatten()
    with pytest.raises(MemoryError, match="native kernel: out of memory"):
        native._block_loss_and_grad(Refusing(), sim[q], q, items, RSkOptions(), 1.0, True, None)
