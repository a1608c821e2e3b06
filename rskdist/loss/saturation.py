"""Detect the saturated regime of RS@k: a loss stuck near 1 whose gradient has vanished.

When every embedding is nearly the same (an untrained backbone from random init), all
similarities tie within tau2, every positive ranks about B/2, and the recall sigmoid
sigmoid((k - rank) / tau1) sits at ~0 for every k: the loss is ~1 and its gradient is
~e^(-B/2). The run then trains for hours and learns nothing. docs/loss.md explains the
cause and the remedies.

The check watches the first steps of a run. Its gradient measure is
sqrt(B) * ||d loss / d E|| over the global batch E (B x d), which does not shrink with
the batch as the plain norm does (the loss is a mean over B queries). Measured with
RS@k's defaults on random unit vectors it is 0.8 to 3.6 (B = 64 to 4096, loss 0.91 to
0.999); on embeddings collapsed to within 1e-1 of one vector it is below 2e-4 at
B = 64 and exactly 0 from B = 512 on. The threshold sits between them. On those
collapsed embeddings tau1 = B/8 brings it back to 0.06-0.12.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

LOSS_NEAR_ONE = 0.98
GRAD_SCALE_VANISHED = 1e-2

def remedies(global_batch: int) -> str:
    return (
        "start from pretrained weights (model.pretrained: a local weights file, docs/models.md); or widen the recall "
        f"sigmoid for the first epochs, loss.tau1={max(1, global_batch // 8)} (about B/8: the ranks of ~B/2 then give "
        "a usable gradient), then resume the run with the default tau1; or lower data.global_batch"
    )


def grad_scale(emb_grad_norm: float, global_batch: int) -> float:
    """The batch-free gradient measure: sqrt(B) * ||d loss / d E||."""
    return math.sqrt(global_batch) * emb_grad_norm


@dataclass
class SaturationCheck:
    """Feed it every step's (loss, embedding-gradient norm); after `steps` steps it
    gives its verdict once: a message when the run is saturated, else None.

    Every rank sees the same all-reduced loss and norm, so every rank reaches the same
    verdict (which makes `loss.saturation=stop` safe to act on without a collective).
    """

    steps: int
    global_batch: int
    losses: list[float] = field(default_factory=list)
    scales: list[float] = field(default_factory=list)
    done: bool = False

    def update(self, loss: float, emb_grad_norm: float) -> str | None:
        if self.done:
            return None
        self.losses.append(float(loss))
        self.scales.append(grad_scale(emb_grad_norm, self.global_batch))
        if len(self.losses) < self.steps:
            return None
        self.done = True
        if min(self.losses) < LOSS_NEAR_ONE or max(self.scales) >= GRAD_SCALE_VANISHED:
            return None
        return (
            f"the RS@k loss is saturated: over the first {self.steps} steps the loss stayed at "
            f"{min(self.losses):.4f}-{max(self.losses):.4f} and the embedding gradient vanished "
            f"(sqrt(B)*|dL/dE| <= {max(self.scales):.1e}, healthy runs show 1e-1 and more). The embeddings are "
            f"nearly identical, every positive ranks about B/2 = {self.global_batch // 2} and the recall "
            f"sigmoids are ~0, so the model cannot learn. Remedies: {remedies(self.global_batch)}"
        )
