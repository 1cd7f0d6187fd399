"""The pretrained encoder as a backbone for dense prediction: its four feature maps (strides 4, 8,
16 and 32), a feature pyramid that torchvision's detectors take, and a small semantic-segmentation
head.

    backbone, report = fcmae.weights.load_backbone("encoder.safetensors")   # any layout it reads
    detector = torchvision.models.detection.FasterRCNN(FeaturePyramid(backbone), num_classes=91,
                                                       image_mean=backbone.mean, image_std=backbone.std)
    segmenter = Segmenter(backbone, num_classes=150)               # logits at the input's size
    groups = fcmae.optim.param_groups(detector, 0.05, layer_decay=0.8)  # the trunk's layer-wise decay

The trunk is timm's convnextv2 (its `forward_intermediates`), so the backbone's maps are those of
timm's `features_only` model with the same weights; fcmae.weights.load_backbone builds one from
any weights file.
"""
from collections import OrderedDict

import torch.nn.functional as F
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from fcmae.data.transforms import IMAGENET_MEAN, IMAGENET_STD

STRIDES = (4, 8, 16, 32)


class Backbone(nn.Module):
    """timm's ConvNeXt V2 trunk without its head, returning the maps of stages `out_indices`
    (a list, strides 4 to 32). `mean`/`std`: the input statistics the weights were trained with."""

    def __init__(self, trunk, out_indices=(0, 1, 2, 3), mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.out_indices = list(out_indices)
        trunk.prune_intermediate_layers(self.out_indices, prune_head=True)
        self.trunk = trunk
        self.channels = [trunk.feature_info[i]["num_chs"] for i in self.out_indices]
        self.strides = [STRIDES[i] for i in self.out_indices]
        self.mean, self.std = list(mean), list(std)

    def forward(self, images):
        return self.trunk.forward_intermediates(images, indices=self.out_indices, intermediates_only=True)


class FeaturePyramid(nn.Module):
    """The backbone's maps through torchvision's FPN, with a max-pooled level on top: the
    OrderedDict ("0".."3", "pool") and `out_channels` that torchvision's FasterRCNN, MaskRCNN and
    RetinaNet take as their backbone (as their resnet_fpn_backbone gives)."""

    def __init__(self, backbone, out_channels=256):
        super().__init__()
        self.body, self.out_channels = backbone, out_channels
        self.fpn = FeaturePyramidNetwork(backbone.channels, out_channels, extra_blocks=LastLevelMaxPool())

    def forward(self, images):
        return self.fpn(OrderedDict((str(i), x) for i, x in enumerate(self.body(images))))


class Segmenter(nn.Module):
    """A semantic-FPN segmentation head on the backbone: the pyramid's levels each brought to
    stride 4 (3x3 conv, GroupNorm, GELU, upsampled), summed, classified per pixel by a 1x1 conv,
    and upsampled to the input's size. Returns logits (N, num_classes, H, W)."""

    def __init__(self, backbone, num_classes, channels=128):
        super().__init__()
        self.backbone = backbone
        self.fpn = FeaturePyramidNetwork(backbone.channels, channels)
        self.levels = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.GroupNorm(8, channels), nn.GELU())
            for _ in backbone.channels)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, images):
        maps = self.fpn(OrderedDict((str(i), x) for i, x in enumerate(self.backbone(images))))
        finest = None
        for level, x in zip(self.levels, maps.values()):
            x = level(x)
            if finest is None:
                finest = x
            else:
                finest = finest + F.interpolate(x, size=finest.shape[-2:], mode="bilinear", align_corners=False)
        logits = self.classifier(finest)
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def segmentation_loss(logits, masks, ignore_index=255):
    """Per-pixel cross-entropy of `logits` (N, K, H, W) against class masks (N, H, W), pixels
    labelled `ignore_index` left out (ADE20K's convention)."""
    return F.cross_entropy(logits.float(), masks.long(), ignore_index=ignore_index)


__all__ = ["Backbone", "FeaturePyramid", "Segmenter", "segmentation_loss", "STRIDES"]
