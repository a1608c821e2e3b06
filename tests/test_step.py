"""The two-pass step in one process: chunked recompute equals a direct full backward,
also with dropout (the backprop pass replays the embed pass's random state)."""

import pytest
import torch
from torch import nn

from rskdist.loss import rsk_loss
from rskdist.parallel.step import chunk_seed, seeded_rng, two_pass_step
from rskdist.build import lr_factor


class Net(nn.Module):
    def __init__(self, p_drop):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(12, 24), nn.ReLU(), nn.Dropout(p_drop), nn.Linear(24, 8))

    def forward(self, x):
        return nn.functional.normalize(self.body(x), dim=1)


class PlainEngine:
    """The engine protocol on plain autograd: accumulate, then let the test read grads."""

    def __init__(self, model):
        self.model, self.backward_calls, self.step_calls = model, 0, 0

    def __call__(self, x):
        return self.model(x)

    def backward(self, loss, scale_wrt_gas=True):
        assert scale_wrt_gas is False  # the step must never let the engine divide by the chunk count
        loss.backward()
        self.backward_calls += 1

    def step(self):
        self.step_calls += 1


@pytest.mark.parametrize("p_drop", [0.0, 0.3])
@pytest.mark.parametrize("chunk", [1, 5, 7, 40])
def test_two_pass_equals_direct_backward(p_drop, chunk):
    torch.manual_seed(0)
    images = torch.randn(28, 3, 2, 2)
    labels = torch.arange(28) // 4
    model = Net(p_drop)
    engine = PlainEngine(model)
    result = two_pass_step(engine, images, labels, loss_fn=lambda e, y: rsk_loss(e, y), chunk_size=chunk,
                           step=3, seed=5)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert engine.backward_calls == engine.step_calls == -(-28 // chunk)

    # Direct: the same per-chunk random states, one graph through the whole batch.
    model.zero_grad()
    outs = []
    for c, x in enumerate(images.split(chunk)):
        with seeded_rng(chunk_seed(5, 3, c * chunk), images.device):
            outs.append(model(x))
    loss = rsk_loss(torch.cat(outs), labels)
    loss.backward()
    assert result.loss == pytest.approx(float(loss.detach()), abs=1e-6)
    for name, param in model.named_parameters():
        torch.testing.assert_close(got[name], param.grad, atol=1e-6, rtol=1e-5)


def test_dropout_masks_differ_across_chunks_and_steps_but_replay_exactly():
    seeds = {chunk_seed(0, s, first) for s in range(3) for first in range(0, 64, 8)}
    assert len(seeds) == 24
    x = torch.ones(1000)
    with seeded_rng(chunk_seed(0, 1, 16), x.device):
        a = nn.functional.dropout(x, 0.5)
    outside = torch.rand(1)
    with seeded_rng(chunk_seed(0, 1, 16), x.device):
        b = nn.functional.dropout(x, 0.5)
    assert torch.equal(a, b)
    # The caller's RNG stream is untouched by the seeded blocks.
    torch.manual_seed(123)
    ref = torch.rand(3)
    torch.manual_seed(123)
    with seeded_rng(7, x.device):
        torch.rand(5)
    assert torch.equal(torch.rand(3), ref)
    del outside


def test_lr_schedule_warmup_and_step_decay():
    kw = dict(steps_per_epoch=10, warmup_steps=4, decay_epochs=[2, 3], decay_factor=0.3)
    assert lr_factor(0, **kw) == pytest.approx(0.25)
    assert lr_factor(3, **kw) == pytest.approx(1.0)
    assert lr_factor(19, **kw) == pytest.approx(1.0)
    assert lr_factor(20, **kw) == pytest.approx(0.3)
    assert lr_factor(35, **kw) == pytest.approx(0.09)


def test_emb_grad_norm_is_the_norm_of_the_embedding_gradient():
    torch.manual_seed(0)
    images, labels = torch.randn(28, 3, 2, 2), torch.arange(28) // 4
    model = Net(0.0)
    result = two_pass_step(PlainEngine(model), images, labels, loss_fn=lambda e, y: rsk_loss(e, y), chunk_size=5,
                           step=0, seed=0)
    emb = model(images).detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(rsk_loss(emb, labels), emb)
    assert float(grad.norm()) > 1e-4
    assert result.emb_grad_norm == pytest.approx(float(grad.norm()), rel=1e-5)
    assert result.step_applied  # an engine without was_step_applied() always applies


class LossScaledHalfEngine(PlainEngine):
    """An fp16 model under a loss-scaling engine: backward multiplies the loss by the scale,
    as DeepSpeed's ZeRO optimizers do; records the gradient reaching the model's output."""

    scale = 2.0**16

    def __init__(self, model):
        super().__init__(model)
        self.out_grads = []

    def __call__(self, x):
        out = self.model(x.float()).half()
        if out.requires_grad:
            out.register_hook(self.out_grads.append)
        return out

    def backward(self, loss, scale_wrt_gas=True):
        super().backward(loss * self.scale, scale_wrt_gas)


def test_cached_gradient_reaches_an_fp16_model_in_fp32_before_the_loss_scale():
    """The backprop pass must scale the fp32 d loss / d emb and round once to fp16; rounding it to fp16
    first (before the scale) loses the entries below fp16's normal range."""
    torch.manual_seed(0)
    images, labels = torch.randn(256, 3, 2, 2), torch.arange(256) // 4
    engine = LossScaledHalfEngine(Net(0.0))
    two_pass_step(engine, images, labels, loss_fn=lambda e, y: rsk_loss(e, y), chunk_size=100, step=0, seed=0,
                  input_dtype=torch.float16)
    with torch.no_grad():
        emb = engine(images.half()).float().requires_grad_(True)  # the fp16 embeddings the embed pass saw
    (ref,) = torch.autograd.grad(rsk_loss(emb, labels), emb)
    assert ((ref != 0) & (ref.abs() < torch.finfo(torch.float16).tiny)).float().mean() > 0.05  # about 10% here
    got = torch.cat(engine.out_grads)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got, (ref * engine.scale).half(), atol=0, rtol=0)

