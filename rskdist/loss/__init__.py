"""RS@k loss (recall@k surrogate) with SiMix, blockwise and exact; baseline losses.

Public API (stable):
    rsk_loss(embeddings, labels, *, ks, tau1, tau2, count_self, mix, block_size, group, impl)
    RSkLoss(...)                       nn.Module wrapper with the same options
    simix_plan(labels, *, per_class, generator) -> (pairs, alphas)
    make_loss(name, *, num_classes, embed_dim, mix, **options) -> nn.Module whose
        forward(embeddings, labels, group=None, plan=None) is the loss of the global
        batch with a group, of the local rows without; LOSS_NAMES lists the names
    loss_memory_bytes(...), check_loss_fits(...): peak memory of one loss call
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from rskdist.comm import group_rank_and_size
from rskdist.loss.baselines import BASELINES, BaselineLoss
from rskdist.loss.distributed import RSkFunction
from rskdist.loss.fused import IMPLS, resolve_impl
from rskdist.loss.memory import check_loss_fits, loss_memory_bytes
from rskdist.loss.mixup import MIX_MODES, check_mix_mode, mix_embeddings, replicated_batch
from rskdist.loss.rsk import DEFAULT_SIM_CACHE_MB, RSkOptions, rsk_forward_backward, validate_inputs
from rskdist.loss.simix import materialise_mix, simix_generator, simix_plan

LOSS_NAMES = ("rsk",) + tuple(BASELINES)

__all__ = ["rsk_loss", "RSkLoss", "RSkOptions", "simix_plan", "simix_generator", "materialise_mix",
           "rsk_forward_backward", "make_loss", "LOSS_NAMES", "MIX_MODES", "BaselineLoss", "mix_embeddings",
           "loss_memory_bytes", "check_loss_fits"]


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
            CPU), "compiled" (torch.compile of the fused passes), "triton" (hand-written
            kernel, CUDA), or "auto" (the fastest measured for the device, docs/loss.md). An unavailable backend falls back to "eager"
            with a one-line warning.

    Returns:
        Scalar float32 loss (float64 for float64 inputs); 0 if no sample has a positive.
    """
    _, world = group_rank_and_size(group)
    if isinstance(labels, torch.Tensor) and isinstance(mix, (tuple, list)) and len(mix) == 2:
        mix = (mix[0].to(labels.device), mix[1].to(labels.device))  # the plan may have been drawn on the CPU
    # Across ranks the plan indexes the gathered batch: it is checked after the gather.
    validate_inputs(embeddings, labels, mix if world == 1 else None)
    pairs, alphas = (None, None) if mix is None else mix
    opts = RSkOptions(
        ks=(int(ks),) if isinstance(ks, int) else tuple(int(k) for k in ks),
        tau1=tau1 if isinstance(tau1, str) else float(tau1), tau2=float(tau2), count_self=bool(count_self),
        virtual_queries=bool(virtual_queries),
    )
    impl = resolve_impl(impl, embeddings.device)  # a bad name fails here, before any gather
    labels = labels.long()
    return RSkFunction.apply(embeddings, labels, pairs, alphas, opts, block_size, sim_cache_mb, group, impl)


class RSkLoss(nn.Module):
    """nn.Module form of `rsk_loss`; options fixed at construction, the plan per call.

    mix: "simix" (default here, as before: a plan given to forward is SiMix inside the
    kernel), "embedding" (the plan's mixed embeddings are materialised, re-normalised and
    appended; across ranks every rank then computes the whole loss, see
    rskdist/loss/mixup.py) or "none" (a plan is an error).
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
        mix: str = "simix",
        impl: str = "auto",
    ):
        super().__init__()
        self.options = dict(
            ks=tuple(ks), tau1=tau1, tau2=tau2, count_self=count_self, block_size=block_size,
            virtual_queries=virtual_queries, sim_cache_mb=sim_cache_mb, impl=impl,
        )
        RSkOptions(ks=self.options["ks"], tau1=tau1, tau2=tau2)  # fail at construction, not at step 1
        if impl not in IMPLS:
            raise ValueError(f"RS@k: impl must be one of {', '.join(IMPLS)}, got {impl!r}")
        self.group = group
        self.mix = check_mix_mode(mix, loss_name="rsk")

    def forward(self, embeddings, labels, group=None, plan=None):
        """Loss of the global batch over `group` (default: the group given at construction;
        None = the rows given). `plan` = (pairs, alphas) indexing the global batch."""
        if isinstance(group, (tuple, list)):
            raise ValueError("RSkLoss.forward(embeddings, labels, group=None, plan=None): the third argument is "
                             "the process group; pass the mix plan as plan=(pairs, alphas)")
        group = self.group if group is None else group
        if plan is not None and self.mix == "none":
            raise ValueError("loss.name=rsk was built with mix=none but got a mix plan; "
                             "build it with mix=simix or mix=embedding, or pass plan=None")
        if self.mix != "embedding":
            return rsk_loss(embeddings, labels, mix=plan, group=group, **self.options)
        validate_inputs(embeddings, labels, None)
        # Every rank gathers, mixes and computes the whole loss (correct, W-fold redundant):
        # the materialised mixed rows are not split over ranks.
        emb, labs = replicated_batch(embeddings if embeddings.dtype == torch.float64 else embeddings.float(),
                                     labels.long(), group)
        if plan is not None:
            emb, labs = mix_embeddings(emb, labs, plan)
        return rsk_loss(emb, labs, group=None, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in {**self.options, "mix": self.mix}.items())


_RSK_OPTIONS = ("ks", "tau1", "tau2", "count_self", "block_size", "virtual_queries", "sim_cache_mb", "impl")


def make_loss(name: str, *, num_classes: int | None = None, embed_dim: int | None = None, mix: str = "none",
              **options) -> nn.Module:
    """The loss `name` (one of LOSS_NAMES) as a module: forward(embeddings, labels, group=None, plan=None).

    With a group the value is the loss of the global batch (every rank's rows
    concatenated in rank order) and the gradient reaches this rank's rows exactly; without
    one it is the loss of the rows given. num_classes and embed_dim are needed by the
    proxy losses (proxy_anchor, norm_softmax, arcface, cosface) and ignored by the others. mix is
    "none", "embedding" or (rsk only) "simix". `options` override the paper defaults
    (rskdist/loss/baselines.py, docs/loss.md). Every module has `lr_multiplier`, the
    learning-rate factor for its parameters (class proxies; 1 where there are none).
    """
    if name not in LOSS_NAMES:
        raise ValueError(f"loss.name={name!r} is not one of {', '.join(LOSS_NAMES)}")
    check_mix_mode(mix, loss_name=name)
    if name == "rsk":
        unknown = sorted(set(options) - set(_RSK_OPTIONS))
        if unknown:
            raise ValueError(f"loss.name=rsk: unknown option(s) {', '.join(unknown)}; valid options: "
                             f"{', '.join(_RSK_OPTIONS)}")
        return RSkLoss(mix=mix, **options)
    return BaselineLoss(name, num_classes=num_classes, embed_dim=embed_dim, mix=mix, **options)
