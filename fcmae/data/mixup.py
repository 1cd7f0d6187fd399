"""Mixup and CutMix for fine-tuning, on the device: timm's, with its per-sample modes batched.

In its per-sample modes ('elem': every sample mixed with its mirror in the batch; 'pair': the
pairs share one draw) timm mixes the images one sample at a time (two kernels each) and sends the
weights with torch.tensor(..., device=...), which makes a CUDA host wait every step. Here the
same draws (timm's own `_params_per_elem` and `cutmix_bbox_and_lam`, in timm's order) become six
numbers per sample that leave pinned memory without waiting, and a few batched operations mix
the whole batch: the same images and targets. The 'batch' mode, the shipped configs', is timm's.
"""
import numpy as np
import torch
from timm.data import Mixup as TimmMixup
from timm.data.mixup import cutmix_bbox_and_lam


def host_to_device(tensor, device):
    """A host tensor on `device`, copied from pinned memory (on CUDA) without waiting."""
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


class Mixup(TimmMixup):
    """timm's Mixup/CutMix (same arguments, draws, images and targets), the per-sample modes batched."""

    def _mix_elem(self, x):
        lam, use_cutmix = self._params_per_elem(len(x))
        boxes = self._boxes(x, lam, use_cutmix)
        return self._mix_with_mirror(x, lam, use_cutmix, boxes)

    def _mix_pair(self, x):
        lam, use_cutmix = self._params_per_elem(len(x) // 2)  # the first half's draws; their partners mirror them
        boxes = self._boxes(x, lam, use_cutmix)

        def mirrored(a):
            return np.concatenate((a, a[::-1]))
        return self._mix_with_mirror(x, mirrored(lam), mirrored(use_cutmix), mirrored(boxes))

    def _boxes(self, x, lam, use_cutmix):
        """(N, 4) CutMix boxes (top, bottom, left, right; empty where a sample is not cut), drawn
        sample by sample as timm draws them; `lam` corrected in place to the boxes' areas."""
        boxes = np.zeros((len(lam), 4), dtype=np.int64)
        for i in range(len(lam)):
            if lam[i] != 1.0 and use_cutmix[i]:
                boxes[i], lam[i] = cutmix_bbox_and_lam(x.shape[1:], lam[i], ratio_minmax=self.cutmix_minmax,
                                                       correct_lam=self.correct_lam)
        return boxes

    def _mix_with_mirror(self, x, lam, use_cutmix, boxes):
        """Mix each sample i of `x` in place with sample N-1-i of the original batch: the box's
        pixels where cut, else lam_i * own + (1 - lam_i) * other. Returns the (N, 1) weights."""
        numbers = np.concatenate([lam[:, None], use_cutmix[:, None], boxes], axis=1).astype(np.float32)
        numbers = host_to_device(torch.from_numpy(numbers), x.device)
        weight, cut, (top, bottom, left, right) = numbers[:, 0], numbers[:, 1] > 0, numbers[:, 2:].unbind(1)
        height, width = x.shape[-2:]
        rows = torch.arange(height, device=x.device).view(1, height, 1)
        columns = torch.arange(width, device=x.device).view(1, 1, width)
        inside = ((rows >= top.view(-1, 1, 1)) & (rows < bottom.view(-1, 1, 1))
                  & (columns >= left.view(-1, 1, 1)) & (columns < right.view(-1, 1, 1)))
        # how much of each pixel stays its own: 0 inside a cut box, 1 outside it, lam where mixed up
        own = torch.where(cut.view(-1, 1, 1), (~inside).to(x.dtype), weight.view(-1, 1, 1).to(x.dtype)).unsqueeze(1)
        other = x.flip(0) * (1 - own)
        x.mul_(own).add_(other)
        return weight.to(x.dtype).unsqueeze(1)
