"""Optimiser parameter groups (weight decay, layer-wise lr decay), the optimisers, and the lr schedule.

    groups = fcmae.optim.param_groups(model, weight_decay=0.05, layer_decay=0.9, layer_decay_type="single")

Each group carries "params", "param_names", "weight_decay" and "lr_scale"; `set_lr` multiplies
the scheduled lr by each group's "lr_scale" (as timm's schedulers do).
"""
import functools
import inspect
import math
import re

import torch


def no_weight_decay(name, param):
    """Biases, 1-D tensors (normalisation weights, GRN of timm's layout), GRN gamma/beta and the
    mask token are not decayed."""
    return (
        param.ndim <= 1
        or name.endswith(".bias")
        or name.endswith((".gamma", ".beta"))
        or ".grn." in name
        or name.split(".")[-1] == "mask_token"
    )


# a parameter of a ConvNeXt V2 trunk, at the top of timm's model or inside a larger one (a detector's
# backbone.body.trunk.stages.0..., timm's features_only stages_0...)
TRUNK_NAME = re.compile(r"(?:^|.*\.)(?:(stem)[._]|stages[._](\d+)\.(?:(downsample)\.|blocks\.(\d+)\.))")
STAGE_BLOCKS = re.compile(r"(?:^|.*\.)stages[._](\d+)\.blocks")


def _stage_block(name):
    """(kind, stage, block) of a parameter of timm's ConvNeXt V2, or of a model that holds one: kind
    is "stem", "downsample", "block" or "other" (the head, and anything outside the trunk)."""
    match = TRUNK_NAME.match(name)
    if match is None:
        return "other", None, None
    stem, stage, downsample, block = match.groups()
    if stem:
        return "stem", 0, None
    if downsample:
        return "downsample", int(stage), None
    return "block", int(stage), int(block)


def trunk_depths(model):
    """The blocks per stage of the ConvNeXt V2 trunk in `model` (timm's model, or a detector or
    segmenter built on one), from its modules' names."""
    depths = {}
    for name, module in model.named_modules():
        if (match := STAGE_BLOCKS.fullmatch(name)) is not None:
            depths[int(match.group(1))] = len(module)
    if sorted(depths) != list(range(len(depths))) or not depths:
        raise ValueError("layer-wise lr decay needs a ConvNeXt V2 trunk (modules named stages.N.blocks); "
                         "this model has none")
    return [depths[i] for i in range(len(depths))]


def layer_id(name, depths, layer_decay_type="single"):
    """The official fine-tuning layer id of a parameter of timm's convnextv2 model.

    'single': stage s block b -> sum(depths[:s]) + b + 1; the stem and the downsampling layer in
    front of stage s share the id of that stage's first block; everything else (the head)
    sum(depths) + 1. 'group' (made for depth-27 third stages): stem 0, stages 0 and 1 -> 1 and 2,
    the downsampling before stages 1 and 2 -> 2 and 3, stage 2 block b -> 3 + b // 3, stage 3 and
    its downsampling 12, everything else 13.
    """
    kind, stage, block = _stage_block(name)
    if layer_decay_type == "single":
        if kind in ("stem", "downsample"):
            return sum(depths[:stage]) + 1
        if kind == "block":
            return sum(depths[:stage]) + block + 1
        return sum(depths) + 1
    if layer_decay_type == "group":
        if kind == "stem":
            return 0
        if kind in ("downsample", "block") and stage == 3:
            return 12
        if kind == "downsample" or stage in (0, 1):
            return stage + 1
        if kind == "block":
            return 3 + block // 3
        return 13
    raise ValueError(f"layer_decay_type must be 'single' or 'group', got {layer_decay_type!r}")


def num_layers(depths, layer_decay_type):
    """The number of decayed layers: sum(depths) for 'single', 12 for 'group' (as the official)."""
    return sum(depths) if layer_decay_type == "single" else 12


def param_groups(model, weight_decay, layer_decay=None, layer_decay_type="single"):
    """AdamW parameter groups of `model`'s trainable parameters.

    Without layer decay (None or 1.0): one decayed group and one with weight_decay 0, lr_scale 1
    (works for any model). With it, `model` is timm's convnextv2 or a model holding one (a
    torchvision detector on fcmae.models.downstream's backbone, timm's features_only model: the
    trunk is found by its stem and stages' names), and each (layer id, decay or not) pair gets a
    group with lr_scale layer_decay ** (num_layers + 1 - id), ordered by layer id; everything
    outside the trunk (a head, a pyramid, a detector's heads) has lr_scale 1.
    """
    use_layers = layer_decay is not None and layer_decay != 1.0
    if use_layers:
        depths = trunk_depths(model)
        top = num_layers(depths, layer_decay_type)
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not no_weight_decay(name, param)
        layer = layer_id(name, depths, layer_decay_type) if use_layers else 0
        key = (layer, decay)
        if key not in groups:
            scale = layer_decay ** (top + 1 - layer) if use_layers else 1.0
            groups[key] = {"params": [], "param_names": [], "weight_decay": weight_decay if decay else 0.0,
                           "lr_scale": scale}
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(name)
    return [groups[key] for key in sorted(groups, key=lambda k: (k[0], not k[1]))]


def pretraining_optimizer(model, lr, weight_decay):
    """pretrain.py's optimiser (and the benchmark's): AdamW (0.9, 0.95) over `param_groups`, fused:
    one kernel for the whole update (3x faster than the default on 2 CPU cores, fewer launches on GPU)."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95), fused=True)


def fused_option(opt):
    """{"fused": True} when timm's optimiser `opt` is a torch optimiser with a fused kernel
    (adamw, adam, sgd, ...), else {} (timm's own, such as lamb, have none)."""
    from timm.optim import get_optimizer_class
    try:
        cls = get_optimizer_class(opt)
    except (ValueError, AssertionError, KeyError):
        return {}  # timm's factory says why when it builds it
    cls = cls.func if isinstance(cls, functools.partial) else cls
    return {"fused": True} if "fused" in inspect.signature(cls).parameters else {}


def cosine_lr(epoch, lr, min_lr, epochs, warmup_epochs):
    """Linear warm-up to `lr`, then a half cosine to `min_lr`; `epoch` is fractional, so the
    schedule moves every iteration (as the official code)."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-12)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
