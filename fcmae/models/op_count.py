"""Operations dispatched by one forward and backward pass of FCMAE, per encoder backend.

Every operation that reaches PyTorch's dispatcher is counted (views and in-place ops included):
on a GPU each computing one is a kernel launch, so the count stands in for the launches of a
step. On the meta device tensors have shapes but no data, so even convnextv2_base at batch 64
is counted in a moment and without memory; the count depends on the shapes only, not on the
values, except where a mask's visible count is unknown (never here: the mask is random). A
convolution's output on the meta device is always in the contiguous layout, not channels-last as
on the CPU and CUDA, so reading it back as rows costs a copy more there (two operations more per
depthwise conv in the sparse backend than a count on the CPU).
"""
import collections
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fcmae.models.fcmae import create_model


class OpCounter(TorchDispatchMode):
    """Counts the operations dispatched while it is active, by name (aten::add.Tensor, ...)."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self):
        return sum(self.counts.values())


@dataclass(frozen=True)
class OpCount:
    backend: str
    device: str
    forward: int
    backward: int
    by_op: dict  # operation name -> count over forward and backward

    @property
    def total(self):
        return self.forward + self.backward


def count_ops(model_name, backend, batch_size, input_size, mask_ratio=0.6, device="meta"):
    """The OpCount of one forward (loss included) and backward pass of FCMAE `model_name` with
    `backend` on `device`, for a random mask whose visible count is known (as pretrain.py's)."""
    height, width = input_size
    device = torch.device(device)
    torch.manual_seed(0)
    with torch.device(device):
        model = create_model(model_name, backend=backend, mask_ratio=mask_ratio)
    imgs = torch.randn(batch_size, 3, height, width, device=device)
    mask = model.random_mask(imgs)
    num_visible = model.num_visible(imgs)
    with OpCounter() as forward:
        loss = model(imgs, mask, num_visible=num_visible)[0]
    with OpCounter() as backward:
        loss.backward()
    return OpCount(backend, device.type, forward.total, backward.total, dict(forward.counts + backward.counts))
