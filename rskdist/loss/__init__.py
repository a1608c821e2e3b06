"""RS@k loss (recall@k surrogate) with SiMix, blockwise and exact; baseline losses.

Public API (stable):
    rsk_loss(embeddings, labels, *, ks, tau1, tau2, count_self, mix, block_size, group, impl)
    RSkLoss(...)                       nn.Module wrapper with the same options
    simix_plan(labels, *, per_class, generator) -> (pairs, alphas)
    make_loss(name, *, num_classes, embed_dim, mix, mix_per_class, **options) -> nn.Module whose
        forward(embeddings, labels, group=None, generator=None) is the loss of the global
        batch with a group, of the local rows without; it draws its own mix plan from
        `generator`; LOSS_NAMES lists the names
    BACKENDS, Backends: RS@k's block backends (rskdist/loss/backends.py)
    loss_memory_bytes(...), check_loss_fits(...): peak memory of one loss call
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from rskdist.comm import group_rank_and_size
from rskdist.loss.backends import BACKENDS, Backends
from rskdist.loss.baselines import BASELINES, BaselineLoss
from rskdist.loss.distributed import RSkFunction
from rskdist.loss.memory import check_loss_fits, loss_memory_bytes
from rskdist.loss.mixup import (MIX_MODES, check_group, check_mix_mode, draw_plan, global_labels, mix_embeddings,
                                replicated_embeddings)
from rskdist.loss.rsk import DEFAULT_SIM_CACHE_MB, RSkOptions, rsk_forward_backward, validate_inputs
from rskdist.loss.simix import materialise_mix, simix_generator, simix_plan

LOSS_NAMES = ("rsk",) + tuple(BASELINES)

__all__ = ["rsk_loss", "RSkLoss", "RSkOptions", "simix_plan", "simix_generator", "materialise_mix",
           "rsk_forward_backward", "make_loss", "LOSS_NAMES", "MIX_MODES", "BaselineLoss", "mix_embeddings",
           "loss_memory_bytes", "check_loss_fits", "BACKENDS", "Backends"]


def rsk_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    ks: Sequence[int] = (1, 2, 4, 8, 16),
    tau1: float | str = 1.0,
    tau2: float = 0.01,
    count_self: bool = False,
    mix: tuple[torch.Tensor, torch.Tensor] | None = None,
    block_size: int | None = None,
    virtual_queries: bool = True,
    sim_cache_mb: float = DEFAULT_SIM_CACHE_MB,
    group=None,
    impl: str = "auto",
    backends: Backends | None = None,
) -> torch.Tensor:
    """RS@k loss of a batch, leave-one-out, as in docs/method.md section 1.

    Args:
        embeddings: (B, d) L2-normalised embeddings (any float dtype; computed in fp32).
        labels: (B,) integer labels, any order and class sizes; samples without a
            positive are skipped as queries but stay in the database.
        ks, tau1, tau2: the surrogate's k values and temperatures; tau1="k" sets tau1 = k for
            each k (the published code's default from 2022 to late 2024).
        count_self: count the query itself in its positives' ranks, as the published
            code does (off by default: ranks then are about 1 too high).
        mix: SiMix plan (pairs, alphas) from `simix_plan`, indexing the (global) batch.
        block_size: queries per block (memory is O(block x P x (B + V))); None = auto.
        virtual_queries: virtual samples act as queries too (else database only).
        sim_cache_mb: single process only: keep S and dS whole (2 x B x B floats) when
            they fit in this many MB; it saves one B x B x d product.
        group: process group to gather over. With one, `embeddings`/`labels` are this
            rank's local batch, the value is the loss of the global batch (ranks
            concatenated in order) and the gradient is this rank's slice of the global
            gradient. None (default) is the one-process loss of the rows given, with no
            collective, even inside an initialised process group.
        impl: block backend: "eager" (unfused), "native" (fused C kernel built for this
            CPU), "triton" (hand-written kernel, CUDA), or "auto" (the fastest measured for
            the device, docs/loss.md). An unavailable backend falls back to "eager" with a
            one-line warning.
        backends: the backend table (default rskdist.loss.BACKENDS; tests pass their own).

    Returns:
        Scalar float32 loss (float64 for float64 inputs); 0 if no sample has a positive.
    """
    if isinstance(labels, torch.Tensor) and isinstance(mix, (tuple, list)) and len(mix) == 2:
        mix = (mix[0].to(labels.device), mix[1].to(labels.device))  # the plan may have been drawn on the CPU
    opts = RSkOptions(
        ks=(int(ks),) if isinstance(ks, int) else tuple(int(k) for k in ks),
        tau1=tau1 if isinstance(tau1, str) else float(tau1), tau2=float(tau2), count_self=bool(count_self),
        virtual_queries=bool(virtual_queries),
    )
    return _rsk(embeddings, labels, None, mix, opts, block_size=block_size, sim_cache_mb=sim_cache_mb,
                group=group, impl=impl, backends=backends)


def _rsk(embeddings, labels, all_labels, mix, opts: RSkOptions, *, block_size, sim_cache_mb, group, impl,
         backends) -> torch.Tensor:
    """`rsk_loss` with its options checked; `all_labels`: the global batch's labels when
    the caller has gathered them already (None: gathered here, across ranks)."""
    _, world = group_rank_and_size(group)
    # Across ranks the plan indexes the gathered batch: it is checked after the gather.
    validate_inputs(embeddings, labels, mix if world == 1 else None)
    pairs, alphas = (None, None) if mix is None else mix
    backends = BACKENDS if backends is None else backends
    impl = backends.resolve(impl, embeddings.device)  # a bad name fails here, before any gather
    return RSkFunction.apply(embeddings, labels.long(), all_labels, pairs, alphas, opts, block_size, sim_cache_mb,
                             group, impl, backends)


class RSkLoss(nn.Module):
    """nn.Module form of `rsk_loss`: options fixed at construction, the mix plan drawn per
    call from the global batch's labels and the call's generator.

    mix (checked by `make_loss`): "simix" (the plan's virtual samples are mixed inside the
    kernel), "embedding" (the plan's mixed embeddings are materialised, re-normalised and
    appended; across ranks every rank then computes the whole loss, see
    rskdist/loss/mixup.py) or "none" (default: no plan is drawn). mix_per_class: virtual
    samples per class (None: every same-class pair).
    """

    lr_multiplier = 1.0  # no parameters; the attribute every loss from make_loss has
    backbone_warmup_epochs = 0.0  # no frozen start (the other attribute every loss has)

    def __init__(
        self,
        ks: Sequence[int] = (1, 2, 4, 8, 16),
        tau1: float | str = 1.0,
        tau2: float = 0.01,
        count_self: bool = False,
        block_size: int | None = None,
        virtual_queries: bool = True,
        sim_cache_mb: float = DEFAULT_SIM_CACHE_MB,
        group=None,
        mix: str = "none",
        mix_per_class: int | None = None,
        impl: str = "auto",
        backends: Backends | None = None,
    ):
        super().__init__()
        self.opts = RSkOptions(ks=tuple(int(k) for k in ks), tau1=tau1 if isinstance(tau1, str) else float(tau1),
                               tau2=float(tau2), count_self=bool(count_self), virtual_queries=bool(virtual_queries))
        self.backends = BACKENDS if backends is None else backends
        self.kernel = dict(block_size=block_size, sim_cache_mb=sim_cache_mb, impl=self.backends.check(impl),
                           backends=self.backends)
        self.group, self.mix, self.mix_per_class = group, mix, mix_per_class

    def forward(self, embeddings, labels, group=None, generator: torch.Generator | None = None):
        """Loss of the global batch over `group` (default: the group given at construction;
        None = the rows given), with a mix plan drawn from `generator` (see `draw_plan`)."""
        check_group(group, "RSkLoss")
        group = self.group if group is None else group
        if self.mix == "embedding":
            validate_inputs(embeddings, labels, None)  # the local rows, before they are gathered
        labels = labels.long() if isinstance(labels, torch.Tensor) else labels
        all_labels = global_labels(labels, group)  # the one gather of the labels
        plan = draw_plan(self.mix, all_labels, per_class=self.mix_per_class, generator=generator)
        if self.mix != "embedding":
            return _rsk(embeddings, labels, all_labels, plan, self.opts, group=group, **self.kernel)
        # Every rank gathers, mixes and computes the whole loss (correct, W-fold redundant):
        # the materialised mixed rows are not split over ranks.
        emb = replicated_embeddings(embeddings if embeddings.dtype == torch.float64 else embeddings.float(), group)
        emb, labs = mix_embeddings(emb, all_labels, plan)
        return _rsk(emb, labs, None, None, self.opts, group=None, **self.kernel)

    def extra_repr(self) -> str:
        options = {**self.opts.__dict__, "block_size": self.kernel["block_size"],
                   "sim_cache_mb": self.kernel["sim_cache_mb"], "impl": self.kernel["impl"], "mix": self.mix,
                   "mix_per_class": self.mix_per_class}
        return ", ".join(f"{k}={v}" for k, v in options.items())


_RSK_OPTIONS = ("ks", "tau1", "tau2", "count_self", "block_size", "virtual_queries", "sim_cache_mb", "impl")


def make_loss(name: str, *, num_classes: int | None = None, embed_dim: int | None = None, mix: str = "none",
              mix_per_class: int | None = None, **options) -> nn.Module:
    """The loss `name` (one of LOSS_NAMES) as a module: forward(embeddings, labels, group=None, generator=None).

    With a group the value is the loss of the global batch (every rank's rows
    concatenated in rank order) and the gradient reaches this rank's rows exactly; without
    one it is the loss of the rows given. The loss gathers the labels once and draws its
    mix plan itself (`simix_plan` of the global labels, `mix_per_class` pairs per class,
    from the call's `generator`). num_classes and embed_dim are needed by the proxy losses
    (proxy_anchor, norm_softmax, arcface, cosface) and ignored by the others. mix is
    "none", "embedding" or (rsk only) "simix", checked here. `options` override the paper
    defaults (rskdist/loss/baselines.py, docs/loss.md). Every module has `lr_multiplier`,
    the learning-rate factor for its parameters (class proxies; 1 where there are none).
    """
    if name not in LOSS_NAMES:
        raise ValueError(f"loss.name={name!r} is not one of {', '.join(LOSS_NAMES)}")
    check_mix_mode(mix, loss_name=name)
    if mix_per_class is not None and (not isinstance(mix_per_class, int) or mix_per_class < 0):
        raise ValueError(f"loss.simix_per_class must be a non-negative integer, got {mix_per_class!r}")
    if name == "rsk":
        unknown = sorted(set(options) - set(_RSK_OPTIONS))
        if unknown:
            raise ValueError(f"loss.name=rsk: unknown option(s) {', '.join(unknown)}; valid options: "
                             f"{', '.join(_RSK_OPTIONS)}")
        return RSkLoss(mix=mix, mix_per_class=mix_per_class, **options)
    return BaselineLoss(name, num_classes=num_classes, embed_dim=embed_dim, mix=mix, mix_per_class=mix_per_class,
                        **options)
