"""What the two-pass step (rskdist/parallel/step.py) runs besides the engine: the step's
loss function (`StepLoss`), the module DeepSpeed trains when the loss has parameters
(`TrainModule`) and the input cast of bf16/fp16 engines (`CastInputs`). The builders that
make them from a config are in rskdist/build.py.
"""

from __future__ import annotations

import torch

from rskdist.loss.simix import simix_generator


class StepLoss:
    """loss_fn(local_emb, local_labels) -> loss of the global batch, for one step.

    The loss draws its mix plan (SiMix or embedding mixup) itself, from the global batch's
    labels and the generator of (seed, step) (`simix_generator`): every rank draws the same
    plan without communicating it, and a resumed run draws the plans of an uninterrupted one.
    A loss with parameters (class proxies) is computed by `criterion`, an fp32 copy of the
    loss that the engine never sees, after `params_from` (the engine's loss) lends it the
    current values: the step takes the gradient of these leaves, `param_leaves`, in the
    loss pass and hands it to the engine's parameters in the backprop pass (step.py). Under
    ZeRO-3 the values are read with the partitions gathered; the copy keeps the engine's
    hooks out of the loss pass.
    """

    def __init__(self, criterion: torch.nn.Module, *, seed: int, step: int, group,
                 params_from: torch.nn.Module | None = None):
        self.criterion, self.seed, self.step, self.group = criterion, seed, step, group
        self.param_leaves: list[torch.Tensor] = list(criterion.parameters())
        if params_from is not None and self.param_leaves:
            from deepspeed import zero

            source = list(params_from.parameters())
            with zero.GatheredParameters(source), torch.no_grad():
                for leaf, value in zip(self.param_leaves, source, strict=True):
                    leaf.copy_(value)

    def __call__(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.criterion(emb, labels, group=self.group, generator=simix_generator(self.seed, self.step))


class TrainModule(torch.nn.Module):
    """What DeepSpeed trains when the loss has parameters: the retrieval model and the
    loss (its class proxies), so that both are optimised, sharded and checkpointed alike.

    forward(images) gives the embeddings; forward(images, param_grads) also gives
    sum_i <p_i, g_i> over the loss's parameters, whose backward hands each p_i the
    gradient g_i of the loss pass (step.py). A loss without parameters is not wrapped: the
    engine trains the model itself, as checkpoints always held it.
    """

    def __init__(self, model: torch.nn.Module, criterion: torch.nn.Module, *, lr_multiplier: float,
                 zero_stage: int = 0):
        super().__init__()
        self.model, self.criterion, self.lr_multiplier = model, criterion, lr_multiplier
        if zero_stage == 3:
            # Used in this module's forward, not the criterion's: ZeRO-3 must gather them here.
            from deepspeed import zero

            for p in criterion.parameters():
                zero.register_external_parameter(self, p)

    def forward(self, images: torch.Tensor, param_grads: list[torch.Tensor] | None = None):
        emb = self.model(images)
        if param_grads is None:
            return emb
        term = sum((p.float() * g).sum() for p, g in zip(self.criterion.parameters(), param_grads))
        return emb, term


class CastInputs(torch.nn.Module):
    """Feeds images in the engine's parameter dtype (bf16/fp16 runs)."""

    def __init__(self, inner: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.inner, self.dtype = inner, dtype

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.inner(images.to(self.dtype)).float()
