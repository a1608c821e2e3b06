"""Optimizer parameter groups for retrieval models."""

from __future__ import annotations

import torch.nn as nn


def param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    exclude_norm_bias: bool = True,
) -> list[dict]:
    """Split trainable parameters into a decayed and a non-decayed group.

    With exclude_norm_bias (default, common practice for ViTs/AdamW, as in timm and
    open_clip), every 1-d parameter (biases, LayerNorm/BatchNorm scales) and the names
    the backbone lists in `no_weight_decay()` (position embeddings, CLS token) get
    weight_decay=0; weight matrices and conv kernels get `weight_decay`. Pass
    exclude_norm_bias=False to decay everything alike (one group). Frozen parameters
    (requires_grad=False) are left out. Group dicts carry only "params" and
    "weight_decay", so any torch optimizer or DeepSpeed accepts them.
    """
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not exclude_norm_bias:
        return [{"params": [p for _, p in trainable], "weight_decay": weight_decay}]
    skip: set[str] = set()
    for prefix, module in model.named_modules():
        names = getattr(module, "no_weight_decay", None)
        if callable(names):
            skip.update(f"{prefix}.{n}" if prefix else n for n in names())
    decay, no_decay = [], []
    for name, p in trainable:
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def backbone_layer_ids(backbone: nn.Module) -> tuple[dict[str, int], int]:
    """({parameter name: layer id}, number of layers) of a backbone, for layer-wise LR decay
    and freezing: id 0 is the stem (patch embedding, position embedding, CLS token, a CNN's
    first convolutions), 1..L the blocks in order, and what follows the last block (final
    norm, a CLIP tower's projection) the last id.

    timm models name their layers through `group_matcher` (the same grouping timm's own
    layer decay uses); open_clip's own towers (ViT, ModifiedResNet) are read from their
    module names, its timm-based towers through the timm trunk.
    """
    named = [n for n, _ in backbone.named_parameters()]
    if callable(getattr(backbone, "group_matcher", None)):
        from timm.models import group_parameters

        groups = group_parameters(backbone, backbone.group_matcher(coarse=False))
        ids = {name: int(gid) for gid, names in groups.items() for name in names}
        return ids, max(ids.values())
    trunk = getattr(backbone, "trunk", None)
    if isinstance(trunk, nn.Module) and callable(getattr(trunk, "group_matcher", None)):
        inner, top = backbone_layer_ids(trunk)
        ids = {n: inner[n[len("trunk."):]] if n.startswith("trunk.") else top + 1 for n in named}
        return ids, top + 1
    blocks = _numbered_blocks(named, ("transformer.resblocks.",)) or _numbered_blocks(
        named, ("layer1.", "layer2.", "layer3.", "layer4."))
    if blocks is None:
        raise ValueError(f"backbone {type(backbone).__name__} has no layer structure rskdist knows (timm group_matcher, "
                         "open_clip ViT or ModifiedResNet); layer decay and freeze_blocks need one")
    ids = {}
    last = max(blocks.values())
    after = ("ln_post", "proj", "attn_pool", "attnpool", "head")
    for name in named:
        if name in blocks:
            ids[name] = blocks[name]
        else:
            ids[name] = last + 1 if name.split(".")[0] in after else 0
    return ids, max(ids.values())


def _numbered_blocks(names: list[str], prefixes: tuple[str, ...]) -> dict[str, int] | None:
    """Layer ids 1.. of parameters under numbered blocks: `transformer.resblocks.<i>.` (one id
    per block) or ResNet stages `layer1.` .. `layer4.` (one id per stage)."""
    ids = {}
    for name in names:
        for k, prefix in enumerate(prefixes):
            if name.startswith(prefix):
                ids[name] = int(name[len(prefix):].split(".")[0]) + 1 if len(prefixes) == 1 else k + 1
    return ids or None


def freeze_parameters(model: nn.Module, *, blocks: int = 0, backbone: bool = False) -> int:
    """Freeze the whole backbone, or its stem and first `blocks` blocks (requires_grad=False:
    no gradient, no optimizer state). Returns the number of frozen parameters' elements."""
    if not blocks and not backbone:
        return 0
    if backbone:
        frozen = list(model.backbone.parameters())
    else:
        ids, num_layers = backbone_layer_ids(model.backbone)
        if blocks >= num_layers:
            raise ValueError(f"model.freeze_blocks={blocks} freezes every layer of a backbone with {num_layers} "
                             f"(stem = 0, blocks 1..{num_layers - 1}, then the final layers); use "
                             "model.freeze_backbone=true for a linear probe")
        frozen = [p for n, p in model.backbone.named_parameters() if ids[n] <= blocks]
    for p in frozen:
        p.requires_grad_(False)
    return sum(p.numel() for p in frozen)


def layered_param_groups(model: nn.Module, weight_decay: float, *, exclude_norm_bias: bool = True,
                         layer_decay: float = 1.0, head_lr_scale: float = 1.0) -> list[dict]:
    """param_groups of a RetrievalModel split into its backbone ("role": "backbone") and
    what follows it ("head": pooling and projection), each group with its "lr_scale":
    layer_decay ** (L + 1 - layer id) in the backbone (layer-wise LR decay: the blocks
    nearest the input learn slowest), `head_lr_scale` on the head."""
    head = nn.ModuleDict({k: m for k, m in model.named_children() if k != "backbone"})
    groups = [dict(g, role="head", lr_scale=head_lr_scale, layers="head")
              for g in param_groups(head, weight_decay, exclude_norm_bias=exclude_norm_bias) if g["params"]]
    if layer_decay == 1.0:
        layers = {0: [p for p in model.backbone.parameters() if p.requires_grad]}
        ids, top = None, 0
    else:
        ids, top = backbone_layer_ids(model.backbone)
        layers = {}
        for name, p in model.backbone.named_parameters():
            if p.requires_grad:
                layers.setdefault(ids[name], []).append(p)
    backbone_groups = []
    for layer, params in sorted(layers.items()):
        keep = {id(p) for p in params}
        for g in param_groups(model.backbone, weight_decay, exclude_norm_bias=exclude_norm_bias):
            chosen = [p for p in g["params"] if id(p) in keep]
            if chosen:
                backbone_groups.append(dict(g, params=chosen, role="backbone", layers=str(layer) if ids else "all",
                                            lr_scale=layer_decay ** (top + 1 - layer) if ids else 1.0))
    return backbone_groups + groups
