"""How gradients flow through every collective of rskdist. Read this before changing any.

The global batch is the concatenation, in rank order, of every rank's local batch
(E_r, y_r), r = 0..W-1. Write E = [E_0; ...; E_{W-1}] (B x d) and L(E) for the RS@k loss
of the global batch (mean over all its queries).

1. Forward of the loss (`rsk_loss(..., group=...)`, `RSkFunction` in rskdist/loss/distributed.py)
   Only an explicit group gathers: group=None is the one-process loss of the rows given,
   with no collective, even inside an initialised process group.
   - `gather_rows` (rskdist/comm.py, like every collective here) all-gathers E_r and y_r WITHOUT autograd (raw all_gather; sizes may
     differ per rank). Every rank now holds E and y.
   - Rank r computes the loss terms of its own queries: its real rows, plus its share of
     the virtual (SiMix) rows (virtual rows are split evenly by rank in plan order). The
     plan (pairs, alphas) indexes the global batch and must be identical on every rank
     (same seeded generator; the trainer gathers y once before the loss to draw it, a
     B-long int64 all-gather). Each term is divided by the number of queries of the WHOLE
     batch, which every rank computes from y alone, so the terms of all ranks add up to L.
   - The kernel returns that partial loss L_r and G_r = d L_r / d E (B x d, all rows: a
     rank's queries look at every key).
   - all_reduce(SUM) of L_r gives L on every rank (what is logged and returned).
   - The gradient of L with respect to this rank's rows is sum_r' G_r'[rows of r]:
     one reduce-scatter (NCCL, equal sizes) or an all_reduce + slice (gloo, or uneven
     sizes). The result is exactly this rank's slice of the single-process gradient.
   The collectives run inside the forward call (gradients are computed eagerly there),
   so every rank runs them in the same order whether or not it calls backward.

2. Backward of the loss: autograd receives d L / d E_r for the local embeddings and
   continues into the backbone of this rank only. No collective runs in backward.

3. Data-parallel averaging. DeepSpeed (and DDP) average parameter gradients over the W
   ranks. The true gradient of L with respect to a parameter is the SUM over ranks of
   each rank's contribution (each rank backpropagates only its own rows). Hence the
   trainer backpropagates W * L (`loss_scale_for_averaging(W)`), so that the average
   DeepSpeed forms equals the sum we need. The logged loss is L, unscaled.

4. Two-pass step (`rskdist.parallel.step`). The embed pass forwards the local batch in chunks
   under no_grad; the gathered loss gives d L / d E_r. The backprop pass recomputes each chunk with
   grad and backpropagates the surrogate sum(e * stop_grad(W * dL/de)), whose gradient
   with respect to the chunk's parameters is exactly that chunk's contribution. dL/de
   and the surrogate are fp32 whatever the model's precision: DeepSpeed's fp16 loss
   scale multiplies them before the gradient is rounded to the model's dtype. Chunks
   are accumulated into one optimizer step without DeepSpeed dividing by the number of
   chunks (scale_wrt_gas=False) and with one gradient reduction per step.

5. Loss parameters (class proxies of a baseline loss, rskdist/loss/baselines.py). Such a
   loss is computed whole on every rank from the gathered batch (`gather_rows_replicated`
   keeps each rank's rows of the embedding gradient), so every rank finds the same, whole
   d L / d P in the loss pass, on an fp32 copy of P that the engine lends its values to
   (`StepLoss` in rskdist/parallel/step_parts.py). The backprop pass hands it to the engine's P through the
   term <P, dL/dP> added to the first chunk's surrogate, unscaled: DeepSpeed's mean over
   ranks of W identical gradients is that gradient (the W of point 3 must not reach P).
   tests/test_loss_params_distributed.py follows several AdamW steps with a warm-up on 2
   ranks (ZeRO 0, 2, 3) against PML's loss in a plain one-process loop.
"""

from __future__ import annotations


def loss_scale_for_averaging(world_size: int) -> float:
    """Factor on the backpropagated loss that turns DeepSpeed's gradient mean into a sum."""
    return float(world_size)
