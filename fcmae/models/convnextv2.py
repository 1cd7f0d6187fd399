"""The ConvNeXt V2 family: names, shapes and the dense trunk that every backend shares.

The dense networks come from timm. The FCMAE encoder keeps timm's parameter layout
(`stem.*`, `stages.i.downsample.*`, `stages.i.blocks.j.*`), so its state dict is a
timm ConvNeXt V2 state dict minus the classifier head the encoder never has.
"""
from dataclasses import dataclass

import timm
from torch import nn

from fcmae.models.backends import get_backend
from fcmae.models.backends.common import ENCODER_STRIDE


@dataclass(frozen=True)
class ConvNeXtV2Spec:
    depths: tuple
    dims: tuple


# Official depths and widths (ConvNeXt V2 paper, table of model sizes).
MODEL_SPECS = {
    "convnextv2_atto": ConvNeXtV2Spec((2, 2, 6, 2), (40, 80, 160, 320)),
    "convnextv2_femto": ConvNeXtV2Spec((2, 2, 6, 2), (48, 96, 192, 384)),
    "convnextv2_pico": ConvNeXtV2Spec((2, 2, 6, 2), (64, 128, 256, 512)),
    "convnextv2_nano": ConvNeXtV2Spec((2, 2, 8, 2), (80, 160, 320, 640)),
    "convnextv2_tiny": ConvNeXtV2Spec((3, 3, 9, 3), (96, 192, 384, 768)),
    "convnextv2_base": ConvNeXtV2Spec((3, 3, 27, 3), (128, 256, 512, 1024)),
    "convnextv2_large": ConvNeXtV2Spec((3, 3, 27, 3), (192, 384, 768, 1536)),
    "convnextv2_huge": ConvNeXtV2Spec((3, 3, 27, 3), (352, 704, 1408, 2816)),
}

def list_models():
    """Names of the ConvNeXt V2 sizes, smallest first."""
    return list(MODEL_SPECS)


def check_model_name(name):
    if name not in MODEL_SPECS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_SPECS)}")


def timm_shape(model):
    """(depths, widths) of a timm ConvNeXt V2 model's four stages."""
    return tuple(len(stage.blocks) for stage in model.stages), tuple(info["num_chs"] for info in model.feature_info)


def model_name(model):
    """The ConvNeXt V2 size of a timm convnextv2 model, from its depths and widths (None if none)."""
    shape = timm_shape(model)
    return next((n for n, s in MODEL_SPECS.items() if (s.depths, s.dims) == shape), None)


def create_convnextv2(name, **kwargs):
    """The dense timm ConvNeXt V2 `name` (keyword arguments go to timm.create_model)."""
    check_model_name(name)
    model = timm.create_model(name, pretrained=False, **kwargs)
    spec = MODEL_SPECS[name]
    depths, dims = timm_shape(model)
    if (depths, dims) != (spec.depths, spec.dims):
        raise RuntimeError(f"the installed timm's {name} has depths {depths} and widths {dims}, "
                           f"not the official {spec.depths} and {spec.dims}; install timm 1.x")
    return model


def average_pooled(trunk, imgs):
    """The dense features of whole images averaged over the positions, (N, C): the stem and stages
    of a timm convnextv2 or of our encoder (timm's `forward_features`, whose norm_pre convnextv2
    has as the identity), no head norm. The mean in float32, so a half-precision trunk loses
    nothing in it."""
    return trunk.stages(trunk.stem(imgs)).float().mean(dim=(2, 3))


class ConvNeXtV2Encoder(nn.Module):
    """ConvNeXt V2 trunk (stem and four stages, no head) whose forward runs a masked-input backend.

    `backend` names the implementation in `fcmae.models.backends`; every backend computes the
    submanifold-sparse network on the visible patches with these same parameters.
    """

    def __init__(self, name, in_chans=3, backend="sparse"):
        super().__init__()
        trunk = create_convnextv2(name, num_classes=0, in_chans=in_chans)
        self.name = name
        self.in_chans = in_chans
        self.dims = MODEL_SPECS[name].dims
        self.depths = MODEL_SPECS[name].depths
        self.num_features = self.dims[-1]
        self.stem = trunk.stem
        self.stages = trunk.stages
        self.backend = backend

    def forward(self, imgs, mask, num_visible=None):
        """Latent map (N, C_last, H/32, W/32) of `imgs` seen through `mask` (N, L), 1 = removed.

        num_visible: the number of visible patches of every sample, when known (random masks):
        then no backend waits for the device to learn it."""
        return get_backend(self.backend).forward(self, imgs, mask, num_visible)


__all__ = [
    "MODEL_SPECS", "ENCODER_STRIDE", "ConvNeXtV2Spec", "ConvNeXtV2Encoder",
    "list_models", "check_model_name", "create_convnextv2",
]
