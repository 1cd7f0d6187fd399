"""AdamW parameter groups and the per-iteration learning-rate schedule."""
import math


def no_weight_decay(name, param):
    """Biases, normalisation weights, GRN gamma/beta and the mask token are not decayed."""
    return (
        param.ndim <= 1
        or name.endswith(".bias")
        or name.endswith((".gamma", ".beta"))
        or ".grn." in name
        or name.split(".")[-1] == "mask_token"
    )


def param_groups(model, weight_decay):
    """Two AdamW groups: decayed weights, and the rest with weight_decay 0."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if no_weight_decay(name, param) else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


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
