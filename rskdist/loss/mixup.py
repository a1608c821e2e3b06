"""The two mixups a loss can run with, and the global batch a replicated loss sees.

- "simix" (RS@k only): virtual samples a * x_i + (1 - a) * x_j, not re-normalised, whose
  similarities are combined from real ones inside RS@k's kernel (rskdist/loss/rsk.py);
  nothing of size V x d is formed. Its scalar form needs a loss written on
  similarities with virtual rows and columns, which no baseline is.
- "embedding" (any loss): the common practice SiMix is compared with. The mixed
  embeddings normalise(a * e_i + (1 - a) * e_j) are materialised (V x d), labelled with
  the pair's class and appended to the batch, so they enter the loss as ordinary samples.
- "none": the batch as it is.

Both draw their pairs and weights from the same plan (`draw_plan`: `simix_plan` of the
global batch's labels), which the loss draws itself from the generator of its call.
"""

from __future__ import annotations

import torch

from rskdist.comm import gather_rows, gather_rows_replicated, group_rank_and_size
from rskdist.loss.rsk import validate_mix
from rskdist.loss.simix import simix_plan

MIX_MODES = ("none", "embedding", "simix")


def check_mix_mode(mix: str, *, loss_name: str) -> str:
    """Validate `mix` for a loss; "simix" only applies to RS@k."""
    if mix not in MIX_MODES:
        raise ValueError(f"loss.mix={mix!r} is not one of {', '.join(MIX_MODES)}")
    if mix == "simix" and loss_name != "rsk":
        raise ValueError(
            f"loss.mix=simix does not apply to loss.name={loss_name}: SiMix mixes scalar similarities "
            "inside RS@k's kernel, and this loss takes embeddings; use loss.mix=embedding "
            "(mixed, re-normalised embeddings appended to the batch) or loss.mix=none"
        )
    return mix


def mix_embeddings(
    embeddings: torch.Tensor, labels: torch.Tensor, plan: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch extended with its mixed samples: (B + V, d) embeddings, (B + V,) labels.

    Row B + v is normalise(alphas[v] * e[i] + (1 - alphas[v]) * e[j]) for (i, j) = pairs[v],
    labelled labels[i]. The input rows are used as given (the losses normalise them).
    Differentiable in `embeddings`.
    """
    pairs, alphas = plan[0].to(labels.device), plan[1].to(labels.device)
    validate_mix((pairs, alphas), labels)
    if pairs.shape[0] == 0:
        return embeddings, labels
    a = alphas.to(embeddings.dtype)[:, None]
    mixed = a * embeddings[pairs[:, 0]] + (1 - a) * embeddings[pairs[:, 1]]
    mixed = torch.nn.functional.normalize(mixed, dim=1)
    return torch.cat([embeddings, mixed]), torch.cat([labels, labels[pairs[:, 0]]])


def check_group(group, loss: str) -> None:
    """A loss's third argument is the process group: a plan or generator there is a mistake."""
    if isinstance(group, (tuple, list, torch.Generator)):
        raise ValueError(f"{loss}.forward(embeddings, labels, group=None, generator=None): the third argument is "
                         f"the process group, got a {type(group).__name__}; the loss draws its own mix plan: pass "
                         "generator=<a torch.Generator> by name")


def global_labels(labels: torch.Tensor, group) -> torch.Tensor:
    """The labels of the global batch (every rank's, in rank order); group=None: `labels`."""
    _, world = group_rank_and_size(group)
    return labels if world == 1 else gather_rows(labels, group)[0]


def draw_plan(mix: str, all_labels: torch.Tensor, *, per_class: int | None,
              generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The mix plan of a call (None for mix="none"): `simix_plan` of the global batch's
    labels, drawn on the CPU with `generator` (seeded alike on every rank, the same plan
    everywhere without communication; None draws from torch's global generator), then
    moved to the labels' device."""
    if mix == "none":
        return None
    pairs, alphas = simix_plan(all_labels.cpu(), per_class=per_class, generator=generator)
    return pairs.to(all_labels.device), alphas.to(all_labels.device)


def replicated_embeddings(embeddings: torch.Tensor, group) -> torch.Tensor:
    """The global batch's embeddings on every rank, for a loss that each rank computes whole
    (`gather_rows_replicated`: backward keeps this rank's rows, exact because every rank's
    computation after it is identical); group=None returns the rows given."""
    _, world = group_rank_and_size(group)
    return embeddings if world == 1 else gather_rows_replicated(embeddings, group)
