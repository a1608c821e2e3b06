"""The saturation check: a loss stuck at ~1 with a vanished gradient is named, a learning one is not."""

import torch
import torch.nn.functional as F

from rskdist.loss import rsk_loss
from rskdist.loss.saturation import SaturationCheck


def _loss_and_norm(emb, labels, **kw):
    emb = emb.clone().requires_grad_(True)
    loss = rsk_loss(emb, labels, **kw)
    (grad,) = torch.autograd.grad(loss, emb)
    return float(loss.detach()), float(grad.norm())


def _collapsed(batch, gen, spread=1e-2):
    base = torch.randn(64, generator=gen)
    return F.normalize(base + spread * torch.randn(batch, 64, generator=gen), dim=1)


def test_collapsed_embeddings_are_reported_with_remedies():
    gen = torch.Generator().manual_seed(0)
    batch = 256
    labels = torch.arange(batch // 4).repeat_interleave(4)
    check = SaturationCheck(steps=3, global_batch=batch)
    verdicts = [check.update(*_loss_and_norm(_collapsed(batch, gen), labels)) for _ in range(3)]
    assert verdicts[:2] == [None, None]  # no verdict before the watched steps are over
    assert "saturated" in verdicts[2] and "model.pretrained" in verdicts[2] and "loss.tau1=32" in verdicts[2]
    assert check.update(1.0, 0.0) is None  # one verdict per run


def test_random_and_clustered_embeddings_pass():
    gen = torch.Generator().manual_seed(1)
    for batch in (64, 1024):
        labels = torch.arange(batch // 4).repeat_interleave(4)
        check = SaturationCheck(steps=2, global_batch=batch)
        results = [check.update(*_loss_and_norm(F.normalize(torch.randn(batch, 64, generator=gen), dim=1), labels))
                   for _ in range(2)]
        assert results == [None, None]  # loss ~0.99 at B=1024, but the gradient is alive


def test_the_suggested_tau1_revives_the_gradient():
    gen = torch.Generator().manual_seed(2)
    batch = 512
    labels = torch.arange(batch // 4).repeat_interleave(4)
    emb = _collapsed(batch, gen)
    stuck = SaturationCheck(steps=1, global_batch=batch)
    assert stuck.update(*_loss_and_norm(emb, labels)) is not None
    wide = SaturationCheck(steps=1, global_batch=batch)
    assert wide.update(*_loss_and_norm(emb, labels, tau1=batch / 8)) is None


def test_a_loss_that_falls_passes():
    check = SaturationCheck(steps=3, global_batch=4096)
    assert [check.update(loss, 0.0) for loss in (0.999, 0.99, 0.97)] == [None, None, None]
