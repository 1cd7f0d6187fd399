"""Exact evaluation over several processes: top-1, top-5 and loss on a labelled dataset.

Each process evaluates its own share of the images (`dataset.evaluation_batches`: a contiguous
share of a folder, every world-th shard of shards; nothing padded or counted twice) and the sums
are added up across processes once, which is the evaluation's one read-back (a designed wait);
no batch makes the host wait. The loader is made once per dataset, so its workers persist from
one evaluation to the next. A process whose data cannot be read says so in the same sum, and
every process stops there with its sentence.
"""
import torch
import torch.nn.functional as F

from fcmae.data import DataError
from fcmae.training.waits import designed_wait, no_wait


def imgs_format(channels_last):
    return torch.channels_last if channels_last else torch.contiguous_format


def logits_of(model, imgs):
    """The evaluation's forward pass. `model.forward`, not `model(...)`: with --compile the call of a
    compiled module is the training graph's, and one compiled evaluation graph serves any module of
    the same architecture in eval mode (the model and its EMA) without a guard failing."""
    return model.forward(imgs)


compiled_logits_of = torch.compile(logits_of)  # compiled lazily, at the first call


def evaluate(run, model, dataset, compiled=False, channels_last=False):
    """{"acc1", "acc5" (percent), "loss" (mean cross-entropy), "images"} of `model` (unwrapped).
    `compiled`: through one compiled graph (the last, smaller batch padded to the batch size, so no
    batch compiles another); `channels_last`: the images in channels-last memory."""
    device = next(model.parameters()).device
    forward = compiled_logits_of if compiled else logits_of
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # top-1 hits, top-5 hits, loss sum
    images = 0  # counted on the host: the batch sizes are known there
    batches = iter(run.evaluation_loader(dataset))  # its workers persist across evaluations
    with torch.no_grad(), run.accelerator.autocast():
        while True:
            with no_wait("evaluation batch"):
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                except DataError as err:  # raised in a worker, it carries the worker's traceback
                    run.data_error = run.data_error or str(err).strip().splitlines()[-1].split("DataError: ", 1)[-1]
                    break
                imgs, _ = dataset.prepare(batch, device, channels_last)
                labels = batch.label.to(device, non_blocking=True)  # pinned by the loader on CUDA
                if compiled and len(imgs) < run.args.batch_size:  # zeros in eval mode change no other logits
                    padding = imgs.new_zeros(run.args.batch_size - len(imgs), *imgs.shape[1:])
                    imgs = torch.cat([imgs, padding]).contiguous(memory_format=imgs_format(channels_last))
                logits = forward(model, imgs)[:len(labels)].float()
                top = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
                sums += torch.stack([top[:, 0].sum().double(), top.any(dim=1).sum().double(),
                                     F.cross_entropy(logits, labels, reduction="sum").double()]).to(sums)
                images += len(labels)
    model.train(was_training)
    with designed_wait("evaluation totals"):
        counts = torch.cat([sums.to(run.device), sums.new_zeros(2).to(run.device)])
        counts[3], counts[4] = images, float(bool(run.data_error))  # filled in place: nothing copied
        hits1, hits5, loss, count, failed = run.accelerator.reduce(counts, reduction="sum").tolist()
    if failed:
        run.stop_for_data(int(failed))
    if count == 0:
        return {"acc1": 0.0, "acc5": 0.0, "loss": float("nan"), "images": 0}
    return {"acc1": 100.0 * hits1 / count, "acc5": 100.0 * hits5 / count, "loss": loss / count, "images": int(count)}
