"""Exact evaluation over several processes: top-1, top-5 and loss on a labelled dataset.

Each process evaluates its own share of the images (`dataset.evaluation_batches`: a contiguous
share of a folder, every world-th shard of shards; nothing padded or counted twice) and the sums
are added up across processes once. The loader is made once per dataset, so its workers persist
from one evaluation to the next.
"""
import torch
import torch.nn.functional as F


def evaluate(run, model, dataset):
    """{"acc1", "acc5" (percent), "loss" (mean cross-entropy), "images"} of `model` (unwrapped)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=run.device)  # top-1 hits, top-5 hits, loss sum, images
    with torch.no_grad(), run.accelerator.autocast():
        for batch in run.evaluation_loader(dataset):  # its workers persist across evaluations
            imgs, _ = dataset.prepare(batch, device)
            logits = model(imgs).float()
            labels = batch.label.to(device)
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
            sums += torch.stack([top[:, 0].sum().double(), top.any(dim=1).sum().double(),
                                 F.cross_entropy(logits, labels, reduction="sum").double(),
                                 torch.tensor(float(len(labels)), dtype=torch.float64, device=device)]).to(sums)
    model.train(was_training)
    hits1, hits5, loss, count = run.accelerator.reduce(sums, reduction="sum").tolist()
    if count == 0:
        return {"acc1": 0.0, "acc5": 0.0, "loss": float("nan"), "images": 0}
    return {"acc1": 100.0 * hits1 / count, "acc5": 100.0 * hits5 / count, "loss": loss / count, "images": int(count)}
