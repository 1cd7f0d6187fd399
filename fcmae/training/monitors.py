"""What shows whether pretraining works, beyond its training loss: a held-out reconstruction loss
and an online k-NN accuracy of the encoder's features.

Held-out loss: every image of the held-out data (pretrain.py's --eval_data_path, or --eval_split
of --data_path) is seen through the evaluation's fixed view (resize, centre crop) and a fixed
mask drawn from (seed, the image's index), the same at every evaluation and on any number of
processes, so the figure is comparable from epoch to epoch and between runs with the same seed.
It is the mean, over all of the held-out images' masked patches, of the loss the model trains
on; each process evaluates its share and the sums are added once.

k-NN: DINO's weighted k-nearest-neighbour classifier (k 20, temperature 0.07 by default) on the
frozen encoder's features: the dense network on the whole image (no mask), global average
pooled and L2-normalised, as timm's `forward_features` and a mean over the positions give them.
A labelled bank (--knn_train_path) is embedded, sharded over the processes and gathered whole
into each; each process classifies its share of the queries (--knn_eval_path); the hits are
summed once, so the figure does not depend on the number of processes. For masked image
modelling a k-NN accuracy understates what fine-tuning reaches; its trend over epochs is the
cheap signal of whether the encoder learns anything.

Each is one designed wait: its totals are read back once per evaluation; no batch waits.
"""
import math

import torch
import torch.nn.functional as F

from fcmae.config import ConfigError
from fcmae.data import DataError
from fcmae.models.convnextv2 import average_pooled
from fcmae.training.waits import designed_wait, no_wait


def batches_of(run, dataset):
    """The batches of this process's share of `dataset` (its loader made once, workers kept); a
    DataError noted on the run (every process stops at the read-back that follows)."""
    batches = iter(run.evaluation_loader(dataset))
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except DataError as err:  # raised in a worker, it carries the worker's traceback
            run.data_error = run.data_error or str(err).strip().splitlines()[-1].split("DataError: ", 1)[-1]
            return
        yield batch


def reduce_totals(run, values):
    """The sums over processes of `values` (device tensors and host numbers), with this process's
    vote that its data could not be read; every process stops when any could not. Host floats."""
    device = run.device
    totals = torch.zeros(len(values) + 1, dtype=torch.float64, device=device)
    for i, value in enumerate(values):
        totals[i] = value if not isinstance(value, torch.Tensor) else value.to(device, torch.float64)
    totals[-1] = float(bool(run.data_error))
    *sums, failed = run.accelerator.reduce(totals, reduction="sum").tolist()
    if failed:
        run.stop_for_data(int(failed))
    return sums


@torch.no_grad()
def held_out_loss(run, model, dataset, num_visible):
    """The mean loss over the masked patches of `dataset`'s images (fixed views and masks: a
    WithMasks(held_out=True) of evaluation views), exact over processes; `model` unwrapped."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum, masked = torch.zeros((), dtype=torch.float64, device=device), 0
    # eager: a --compile run's graph is the training step's
    with run.accelerator.autocast(), torch.compiler.set_stance("force_eager"):
        for batch in batches_of(run, dataset):
            with no_wait("held-out batch"):
                imgs, _ = dataset.prepare(batch, device)
                mask = batch.mask.to(device, non_blocking=True)
                loss, _, _ = model.forward_masked(imgs, mask.to(imgs.dtype), num_visible)
                removed = len(mask) * (mask.shape[1] - num_visible)  # every mask removes the same number
                loss_sum += loss.double() * removed  # the batch's mean back to its sum
                masked += removed
    model.train(was_training)
    with designed_wait("held-out totals"):
        total, count = reduce_totals(run, [loss_sum, masked])
    return total / count if count else math.nan


def pooled_features(encoder, imgs):
    """The encoder's dense features of whole images, globally average pooled and L2-normalised."""
    return F.normalize(average_pooled(encoder, imgs), dim=1)


@torch.no_grad()
def embed(run, encoder, dataset):
    """(features (n, C), labels (n,)) of this process's share of `dataset`, on the device."""
    device = next(encoder.parameters()).device
    features, labels = [], []
    with run.accelerator.autocast():
        for batch in batches_of(run, dataset):
            with no_wait("k-NN batch"):
                imgs, _ = dataset.prepare(batch, device)
                features.append(pooled_features(encoder, imgs))
                labels.append(batch.label.to(device, non_blocking=True))
    if not features:
        return torch.zeros(0, encoder.num_features, device=device), torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat(features), torch.cat(labels)


def gather_all(run, tensor):
    """`tensor` (n, ...) of every process, concatenated in process order (shares may differ in size)."""
    if run.world == 1:
        return tensor
    with designed_wait("k-NN bank"):  # the shares' sizes, read once per evaluation
        sizes = run.accelerator.gather(torch.tensor([len(tensor)], device=tensor.device)).tolist()
    padded = run.accelerator.pad_across_processes(tensor, dim=0)
    gathered = run.accelerator.gather(padded).reshape(run.world, -1, *tensor.shape[1:])
    return torch.cat([gathered[r, :n] for r, n in enumerate(sizes)])


def weighted_knn(bank, bank_labels, queries, query_labels, num_classes, k=20, temperature=0.07, chunk=512):
    """(top-1 hits, top-5 hits) of DINO's weighted k-NN: each query's k most similar bank features
    (cosine similarity of normalised features) vote for their class with weight exp(sim / T)."""
    hits1 = torch.zeros((), dtype=torch.long, device=queries.device)
    hits5 = torch.zeros_like(hits1)
    top = min(5, num_classes)
    for start in range(0, len(queries), chunk):
        q, labels = queries[start:start + chunk], query_labels[start:start + chunk]
        similarity, neighbours = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(q), num_classes, device=q.device)
        votes.scatter_add_(1, bank_labels[neighbours], (similarity / temperature).exp())
        predicted = votes.topk(top, dim=1).indices
        hits1 += (predicted[:, 0] == labels).sum()
        hits5 += (predicted == labels[:, None]).any(dim=1).sum()
    return hits1, hits5


class KnnMonitor:
    """The k-NN accuracy of an encoder's features: a labelled bank and labelled queries (Images of
    evaluation views, the queries' labels renumbered to the bank's classes by name)."""

    def __init__(self, bank, queries, k=20, temperature=0.07):
        self.bank, self.queries, self.k, self.temperature = bank, queries, k, temperature
        self.num_classes = len(bank.classes)
        if len(bank) < k:
            raise ConfigError(f"the k-NN bank {bank.source.where} has {len(bank)} images, fewer than --knn_k {k}; "
                              "lower --knn_k or give the bank more images")

    def __call__(self, run, encoder):
        """{"knn_top1", "knn_top5"} in percent."""
        was_training = encoder.training
        encoder.eval()
        bank, bank_labels = (gather_all(run, t) for t in embed(run, encoder, self.bank))
        queries, query_labels = embed(run, encoder, self.queries)
        hits1, hits5 = weighted_knn(bank, bank_labels, queries, query_labels, self.num_classes, self.k,
                                    self.temperature)
        encoder.train(was_training)
        with designed_wait("k-NN totals"):
            top1, top5, count = reduce_totals(run, [hits1, hits5, len(queries)])
        if not count:
            return {"knn_top1": math.nan, "knn_top5": math.nan}
        return {"knn_top1": 100.0 * top1 / count, "knn_top5": 100.0 * top5 / count}



class Monitors:
    """pretrain.py's monitors, at the end of every epoch they are due in (every `eval_freq` epochs
    for the held-out loss, every `knn_every` for the k-NN, and the last epoch for both) and at the
    end of a run stopped inside an epoch: said in one line, and returned as entries of the epoch's
    log.txt line, metrics.json and the tracker."""

    def __init__(self, run, held_out=None, knn=None, num_visible=None, eval_freq=1, knn_every=1):
        self.run, self.held_out, self.knn, self.num_visible = run, held_out, knn, num_visible
        self.eval_freq, self.knn_every = eval_freq, knn_every
        self.measured_at = None  # the global step of the last measurement

    def __bool__(self):
        return self.held_out is not None or self.knn is not None

    def __call__(self, model, epoch, last=False):
        """The entries of the monitors due after `epoch` (all of them when `last`); `model` unwrapped."""
        done = epoch + 1
        entries = {}
        if self.held_out is not None and (last or done % self.eval_freq == 0):
            entries["held_out_loss"] = held_out_loss(self.run, model, self.held_out, self.num_visible)
        if self.knn is not None and (last or done % self.knn_every == 0):
            entries.update(self.knn(self.run, model.encoder))
        if entries:
            self.report(epoch, entries)
        return entries

    def report(self, epoch, entries):
        run = self.run
        self.measured_at = run.state.global_step
        parts = [f"held-out loss {entries['held_out_loss']:.4f}"] if "held_out_loss" in entries else []
        if "knn_top1" in entries:
            parts.append(f"k-NN top-1 {entries['knn_top1']:.2f}%, top-5 {entries['knn_top5']:.2f}%")
        run.say(f"epoch {epoch} (step {run.state.global_step}): " + ", ".join(parts))
        run.write_metrics({"epoch": epoch, "step": run.state.global_step, **entries})
        if run.log_with:
            run.accelerator.log({f"eval/{k}": v for k, v in entries.items()}, step=run.state.global_step)

    def at_end(self, model):
        """After training: the monitors once more when the run stopped after its last measurement
        (inside an epoch, --max_steps), with a log line of that point."""
        run = self.run
        if not self or self.measured_at == run.state.global_step:
            return
        entries = self(model, run.state.epoch, last=True)
        done = run.state.epoch + run.state.step_in_epoch / run.steps_per_epoch_
        run.append_log({"epoch": run.state.epoch, "step": run.state.global_step, "partial_epoch": done, **entries})
