"""Where in the encoder is the information? A quick linear probe of each stage's pooled features.

    python benchmarks/bloodmnist/stage_probe.py --data runs/bloodmnist_full/data \
        --weights runs/bloodmnist_full/pretrain/encoder.safetensors --size 64

For a randomly initialised convnextv2_atto and for the given weights: features of train/ and
test/ without augmentation (the evaluation transform, crop_pct 1), each stage's output averaged
over positions and the head's pooled, normalised features; then a multinomial logistic
regression (standardised features, L-BFGS, small L2) per feature set. Prints test / train top-1.
Also two signs of feature collapse: the effective rank (exp of the entropy of the normalised
squared singular values) of each stage's pooled features over the test images, and, as in the
ConvNeXt V2 paper's collapse analysis, the mean pairwise cosine distance / 2 between the
channels' feature maps after each block's MLP activation (0.5: unrelated channels, 0: all alike).
A diagnostic for the investigation in the README, not the experiment's protocol (that is
finetune.py --linear_probe true).
"""
import argparse

import timm
import torch
import torch.nn.functional as F

from fcmae.data import EvalTransform, FullDecoder, class_folders, collate, normalization, open_images
from fcmae.weights import load_classifier


def channel_distance(activation):
    """Mean over samples of the mean pairwise cosine distance / 2 between channel maps (N, C, H, W)."""
    maps = F.normalize(activation.flatten(2), dim=2)
    cosine = maps @ maps.transpose(1, 2)
    return ((1 - cosine).mean((1, 2)) / 2).sum().item()


def effective_rank(x):
    singular = torch.linalg.svdvals(x - x.mean(0))
    p = singular ** 2 / (singular ** 2).sum()
    return torch.exp(-(p * p.clamp_min(1e-12).log()).sum()).item()


def features(model, root, size, batch=256, diversity=None):
    """Pooled features of each stage and the head; `diversity` (a dict) collects channel distances per stage."""
    mean, std = normalization(3)
    data = open_images(root, EvalTransform(size, mean, std, crop_pct=1.0), decoder=FullDecoder(), labelled=True)
    loader = torch.utils.data.DataLoader(data, batch_sampler=data.evaluation_batches(0, 1, batch), num_workers=2,
                                         collate_fn=collate)
    labels = []
    hooks = []
    if diversity is not None:
        for i, stage in enumerate(model.stages):
            for block in stage.blocks:
                def hook(module, inputs, output, i=i, n=len(stage.blocks) * len(data)):
                    diversity[i] = diversity.get(i, 0.0) + channel_distance(output) / n
                hooks.append(block.mlp.act.register_forward_hook(hook))
    out = {}
    with torch.no_grad():
        for batch in loader:
            imgs, _ = data.prepare(batch, "cpu")
            labels.append(batch.label)
            x = model.stem(imgs)
            parts = {}
            for i, stage in enumerate(model.stages):
                x = stage(x)
                parts[f"stage {i}"] = x.mean((2, 3))
            parts["head (pooled, normalised)"] = model.forward_head(x, pre_logits=True)
            for key, value in parts.items():
                out.setdefault(key, []).append(value)
    for hook in hooks:
        hook.remove()
    return {k: torch.cat(v) for k, v in out.items()}, torch.cat(labels)


def logistic_probe(train, y_train, test, y_test, classes, steps=300, l2=1e-3):
    mean, std = train.mean(0), train.std(0) + 1e-6
    train, test = (train - mean) / std, (test - mean) / std
    linear = torch.nn.Linear(train.shape[1], classes)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=steps)

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(linear(train), y_train) + l2 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return [100.0 * (linear(x).argmax(1) == y).float().mean().item() for x, y in ((test, y_test), (train, y_train))]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="folder with train/ and test/ class folders")
    p.add_argument("--weights", required=True, help="pretrained encoder (any layout fcmae.weights reads)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--model", default="convnextv2_atto")
    args = p.parse_args()
    classes = len(class_folders(f"{args.data}/train")[2])
    for name in ("random", "pretrained"):
        torch.manual_seed(0)
        model = timm.create_model(args.model, num_classes=classes).eval()
        if name == "pretrained":
            load_classifier(model, args.weights)
        diversity = {}
        train, y_train = features(model, f"{args.data}/train", args.size)
        test, y_test = features(model, f"{args.data}/test", args.size, diversity=diversity)
        scores = {k: logistic_probe(train[k], y_train, test[k], y_test, classes) for k in train}
        print(f"{name:>10}: " + "; ".join(f"{k} {a:.1f} / {b:.1f}" for k, (a, b) in scores.items()), flush=True)
        print(" " * 12 + "effective rank (test): " + "; ".join(
            f"{k} {effective_rank(v):.1f} of {v.shape[1]}" for k, v in test.items() if k.startswith("stage")))
        print(" " * 12 + "channel distance (test): " + "; ".join(
            f"stage {i} {d:.2f}" for i, d in sorted(diversity.items())), flush=True)


if __name__ == "__main__":
    main()
