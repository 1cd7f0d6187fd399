"""The encoder for dense prediction: timm's features_only model and transformers' ConvNextV2Backbone
on fcmae's exports, and torchvision's Faster R-CNN and the segmentation head training on them."""
import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

import fcmae
from conftest import randomize_, rel_err
from fcmae.models.downstream import FeaturePyramid, Segmenter, segmentation_loss
from fcmae.optim import param_groups
from fcmae.weights import load_backbone


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A pretrained-looking FCMAE model's encoder as a training checkpoint, a timm file and an hf folder."""
    folder = tmp_path_factory.mktemp("exports")
    model = randomize_(fcmae.create_model("convnextv2_atto"), seed=5)
    fcmae.weights.save_weights(model.state_dict(), folder / "fcmae.safetensors")
    fcmae.weights.export(model, "timm", folder / "timm.safetensors")
    fcmae.weights.export(model, "hf", folder / "hf")
    return folder


def images(seed=0, size=(96, 128)):
    return torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(seed))


def test_timm_features_only_gives_four_maps_equal_to_the_backbones(exports):
    features = timm.create_model("convnextv2_atto", features_only=True, pretrained=True,
                                 pretrained_cfg_overlay={"file": str(exports / "timm.safetensors")}).eval()
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    x = images()
    with torch.no_grad():
        maps = features(x)
        widths, strides = (40, 80, 160, 320), (4, 8, 16, 32)
        assert [m.shape for m in maps] == [(2, c, 96 // s, 128 // s) for c, s in zip(widths, strides)]
        for layout in ("fcmae.safetensors", "timm.safetensors", "hf"):  # any layout gives the same backbone
            backbone = load_backbone(exports / layout)[0].eval()
            assert backbone.channels == [40, 80, 160, 320] and backbone.strides == [4, 8, 16, 32]
            for ours, theirs in zip(backbone(x), maps):
                assert torch.equal(ours, theirs), layout
    assert not any(name.startswith("trunk.head") for name, _ in backbone.named_parameters())
    assert backbone.mean == list(timm.data.IMAGENET_DEFAULT_MEAN)  # the hf export keeps none: ImageNet's


def test_the_backbone_keeps_the_statistics_the_weights_were_trained_with(exports, tmp_path):
    model = fcmae.create_model("convnextv2_atto")
    fcmae.weights.export(model, "timm", tmp_path / "kept.safetensors", statistics={"mean": (0.1, 0.2, 0.3),
                                                                                   "std": (0.4, 0.5, 0.6)})
    backbone, report = load_backbone(tmp_path / "kept.safetensors")
    assert (backbone.mean, backbone.std) == ([0.1, 0.2, 0.3], [0.4, 0.5, 0.6]) and report["loaded"] == "encoder"


def test_transformers_backbone_maps_are_timms_before_its_fresh_norms(exports):
    transformers = pytest.importorskip("transformers")
    hf = transformers.ConvNextV2Backbone.from_pretrained(
        exports / "hf", out_features=["stage1", "stage2", "stage3", "stage4"]).eval()
    timm_maps = load_backbone(exports / "timm.safetensors")[0].eval()
    x = images(1)
    with torch.no_grad():
        out = hf(x, output_hidden_states=True)
        ours = timm_maps(x)
    for theirs, mine in zip(out.hidden_states[1:], ours):  # the stages' outputs: the same network
        assert rel_err(theirs, mine) < 1e-5
    # the Backbone's own per-stage LayerNorms are new (weight 1, bias 0): they normalise each map over channels
    for theirs, mine in zip(out.feature_maps, ours):
        normed = F.layer_norm(mine.permute(0, 2, 3, 1), mine.shape[1:2], eps=1e-6).permute(0, 3, 1, 2)
        assert rel_err(theirs, normed) < 1e-4


def boxes_and_masks(size=(96, 128)):
    """Two images with bright rectangles on a textured ground, their boxes and classes, and masks."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, *size, generator=gen) * 0.3
    masks = torch.zeros(2, *size, dtype=torch.long)
    targets = []
    for i, rects in enumerate([[(10, 8, 50, 40, 1), (70, 40, 120, 90, 2)], [(20, 30, 60, 80, 2)]]):
        boxes, labels = [], []
        for x0, y0, x1, y1, label in rects:
            x[i, label - 1, y0:y1, x0:x1] += 2.0
            masks[i, y0:y1, x0:x1] = label
            boxes.append([x0, y0, x1, y1])
            labels.append(label)
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)})
    return x, targets, masks


def train(model, loss_of, steps=10, lr=2e-4):
    """The losses of `steps` AdamW steps, the trunk with layer-wise lr decay from fcmae.optim."""
    groups = param_groups(model, 0.05, layer_decay=0.8)
    scales = {name: group["lr_scale"] for group in groups for name in group["param_names"]}
    stem = next(name for name in scales if name.endswith("trunk.stem.0.weight"))
    assert scales[stem] == pytest.approx(0.8 ** 12)  # atto's 12 blocks: the stem goes with the first, layer 1
    assert max(scales.values()) == 1.0  # the heads
    optimizer = torch.optim.AdamW(groups, lr=lr)
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    losses = []
    for _ in range(steps):
        loss = loss_of(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_faster_rcnn_trains_on_the_fcmae_backbone(exports):
    torch.manual_seed(0)
    backbone = load_backbone(exports / "fcmae.safetensors")[0]
    # torchvision's defaults, narrowed for two small images on a CPU (a 64-channel pyramid, a 256-wide box head, fewer
    # proposals), and every anchor and proposal in the losses: no sampler draws, so the batch stays fixed
    box_head = torchvision.models.detection.faster_rcnn.TwoMLPHead(64 * 7 * 7, 256)
    detector = torchvision.models.detection.FasterRCNN(
        FeaturePyramid(backbone, out_channels=64), min_size=96, max_size=128, image_mean=backbone.mean,
        image_std=backbone.std, box_head=box_head, box_predictor=FastRCNNPredictor(256, 3),
        rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=100, rpn_batch_size_per_image=100_000,
        box_batch_size_per_image=100_000)
    x, targets, _ = boxes_and_masks()
    detector.train()
    losses = train(detector, lambda m: sum(m(list(x), targets).values()), lr=3e-4)
    # as the proposals improve, more of them are positive and add box-regression loss, so the total falls
    # unevenly: the last steps' mean against the first steps' (0.5 to 0.7 over 3 seeds and 1 or 2 threads)
    assert all(torch.isfinite(torch.tensor(losses))) and sum(losses[-3:]) < 0.85 * sum(losses[:3]), losses
    detector.eval()
    with torch.no_grad():
        detections = detector(list(x))
    assert len(detections) == 2 and set(detections[0]) == {"boxes", "labels", "scores"}


def test_the_segmentation_head_trains_on_the_fcmae_backbone(exports):
    torch.manual_seed(0)
    segmenter = Segmenter(load_backbone(exports / "fcmae.safetensors")[0], num_classes=3, channels=64)
    x, _, masks = boxes_and_masks()
    masks[0, :4] = 255  # ignored pixels
    assert segmenter(x).shape == (2, 3, 96, 128)
    losses = train(segmenter, lambda m: segmentation_loss(m(x), masks), lr=1e-3)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < 0.7 * losses[0], losses


def test_layer_decay_finds_the_trunk_in_timms_features_only_model():
    features = timm.create_model("convnextv2_atto", features_only=True)
    scales = {name: g["lr_scale"] for g in param_groups(features, 0.05, layer_decay=0.5) for name in g["param_names"]}
    assert scales["stem_0.weight"] == pytest.approx(0.5 ** 12)  # stage 0's first block: layer 1 of 12 + 1
    assert scales["stages_3.blocks.1.mlp.fc2.weight"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="needs a ConvNeXt V2 trunk"):
        param_groups(torch.nn.Linear(2, 2), 0.05, layer_decay=0.5)
