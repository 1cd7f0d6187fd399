"""Where in the encoder is the information? A quick linear probe of each stage's pooled features.

    python benchmarks/bloodmnist/stage_probe.py --data runs/bloodmnist_full/data \
        --weights runs/bloodmnist_full/pretrain/encoder.safetensors --size 64

For a randomly initialised convnextv2_atto and for the given weights: features of train/ and
test/ without augmentation (the evaluation transform, crop_pct 1), each stage's output averaged
over positions and the head's pooled, normalised features; then a multinomial logistic
regression (standardised features, L-BFGS, small L2) per feature set. Prints test / train top-1.
A diagnostic for the investigation in the README, not the experiment's protocol (that is
finetune.py --linear_probe true).
"""
import argparse

import timm
import torch
import torch.nn.functional as F

from fcmae.data import LabelledImages, class_folders, eval_transform, normalization
from fcmae.weights import load_classifier


def features(model, root, size, batch=256):
    files, labels, _ = class_folders(root)
    mean, std = normalization(3)
    data = LabelledImages(files, labels, eval_transform(size, mean, std, crop_pct=1.0))
    loader = torch.utils.data.DataLoader(data, batch_sampler=[[(i, 0) for i in range(s, min(s + batch, len(data)))]
                                                              for s in range(0, len(data), batch)], num_workers=2)
    out = {}
    with torch.no_grad():
        for imgs, _, _ in loader:
            x = model.stem(imgs)
            parts = {}
            for i, stage in enumerate(model.stages):
                x = stage(x)
                parts[f"stage {i}"] = x.mean((2, 3))
            parts["head (pooled, normalised)"] = model.forward_head(x, pre_logits=True)
            for key, value in parts.items():
                out.setdefault(key, []).append(value)
    return {k: torch.cat(v) for k, v in out.items()}, torch.tensor(labels)


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
        train, y_train = features(model, f"{args.data}/train", args.size)
        test, y_test = features(model, f"{args.data}/test", args.size)
        scores = {k: logistic_probe(train[k], y_train, test[k], y_test, classes) for k in train}
        print(f"{name:>10}: " + "; ".join(f"{k} {a:.1f} / {b:.1f}" for k, (a, b) in scores.items()), flush=True)


if __name__ == "__main__":
    main()
