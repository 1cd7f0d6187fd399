"""Mixup/CutMix on the device: the same images and targets as timm's, without waiting for the GPU."""
import numpy as np
import pytest
import torch
from timm.data import Mixup as TimmMixup

from fcmae.data import Mixup

SETTINGS = {
    "mixup": dict(mixup_alpha=0.8, cutmix_alpha=0.0),
    "cutmix": dict(mixup_alpha=0.0, cutmix_alpha=1.0),
    "both": dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5),
    "minmax": dict(mixup_alpha=0.0, cutmix_alpha=0.0, cutmix_minmax=(0.2, 0.8)),
    "sometimes": dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.5),
}


@pytest.mark.parametrize("mode", ["elem", "pair", "batch"])
@pytest.mark.parametrize("setting", SETTINGS)
def test_the_same_images_and_targets_as_timm(mode, setting):
    kwargs = dict(**SETTINGS[setting], mode=mode, label_smoothing=0.1, num_classes=10)
    images = torch.randn(8, 3, 24, 20, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(8) % 10
    results = []
    for cls in (TimmMixup, Mixup):
        np.random.seed(2)
        results.append(cls(**kwargs)(images.clone(), labels.clone()))
    (theirs, their_targets), (ours, our_targets) = results
    assert torch.equal(ours, theirs) and torch.equal(our_targets, their_targets)
    assert not torch.equal(ours, images)  # something was mixed


def test_the_per_sample_weights_leave_pinned_memory_without_waiting():
    from fcmae.training import waits
    from fcmae.training.sync_check import StandIn
    images = torch.zeros(4, 3, 8, 8, device="meta")
    labels = torch.zeros(4, dtype=torch.long, device="meta")
    stand_in = StandIn([])
    with stand_in.watching(), waits.no_wait("optimiser step"):
        Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, mode="elem", num_classes=10)(images, labels)
    # on the meta device nothing is pinned: the one copy is the weights', non-blocking
    assert [f.problem for f in stand_in.report.findings] == [
        "copies from the host to the device out of unpinned (pageable) memory"]
    stand_in = StandIn([])
    with stand_in.watching(), waits.no_wait("optimiser step"):
        TimmMixup(mixup_alpha=0.8, cutmix_alpha=1.0, mode="elem", num_classes=10)(images, labels)
    assert any("torch.tensor" in f.problem for f in stand_in.report.findings)
