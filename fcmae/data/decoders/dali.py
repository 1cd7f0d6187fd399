"""NVIDIA DALI: pretraining's JPEGs decoded on the GPU, a micro-batch at a time, ahead of the step.

The loader's workers do not decode: they read each image's bytes, open its header with Pillow to
learn its size, draw the crop box and the flip exactly as for the other decoders (inside the
sample's seeded block), and ship (bytes, Crop) as an `Encoded`. `DaliDecoder.decode_batch` then
decodes the micro-batch with one DALI pipeline: only the crop's region of each image
(decoders.image_slice: ROI decoding in nvJPEG and libjpeg-turbo; exact integer boxes), a resize
to Crop.size with DALI's cubic filter and antialiasing (torchvision's RandomResizedCrop on PIL
images is bicubic with antialias), the flip as a mirrored resize region, and uint8 (N, H, W, C)
out: DALI's own layout, and the CPU decoders' (pil.to_tensor), which to_device expects. Data
order, crops, masks and exact resume stay as they are; only the pixels' arithmetic differs from
Pillow's, slightly (tests/test_dali.py states by how much: on the CPU about 0.15 levels of 255 on
average, 55 dB; greyscale made from RGB files about 0.4 levels darker, DALI truncating).

On a CUDA device the decoding is DALI's "mixed" one: nvJPEG, and the hardware JPEG decoder of
A100/H100/H200, which DALI uses by default where the GPU has one (hw_decoder_load, its default).
On a CPU device the same pipeline runs on the CPU (libjpeg-turbo), in the main process: there to
test the GPU's path (and to compare its pixels with Pillow's), not to be faster than `scaled`.

Decoding ahead. The training loop wraps its loader's iterator in `DaliDecoder.ahead` (through
Images.decode_ahead): when the loop asks for micro-batch k, micro-batch k+1 is taken from the
loader and fed to its pipeline (external_source's feed_input, then schedule_run), and only then
is k handed out; `decode_batch` (Images.prepare) then takes k's outputs. So DALI decodes k+1 in
its own threads (and on the GPU) while the step of k runs, with a queue of PREFETCH = 2 batches.
A batch given to `decode_batch` without `ahead` (the bench, the tests) is fed and taken at once.
The pipelines use DALI's dynamic executor, whose outputs live as long as they are referenced:
on CUDA the outputs are taken bound to torch's current stream (ready there, the host does not
wait), copied into a torch tensor on that stream, and kept referenced until an event recorded
after the copy has passed, so DALI cannot reuse the memory before the copy has run; on a CPU
the copy is made at once, and what is returned never aliases DALI's buffers.

A file DALI cannot decode stops the pipeline; that micro-batch is then decoded by Pillow in the
main process (see decode_batch), and the batches fed after it are fed again to a new pipeline.
DALI can be less strict than Pillow: its libjpeg-turbo decodes a JPEG whose entropy-coded data is
damaged but complete, with a warning, where Pillow refuses it.

Threads of the pipeline: the constructor's `num_threads`, else the environment variable
FCMAE_DALI_THREADS, else 4 on a GPU and 1 on a CPU (where the training step needs the cores).

`crop_pil` and `whole` are ScaledDecoder's, inherited: transforms that want PIL images (fine-tuning's
RandAugment path, evaluation) decode on the CPU in the workers with Pillow, as with `scaled`
(finetune.py refuses --decoder dali all the same).
"""
import collections
import io
import os
import re
import warnings
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from fcmae.config import ConfigError
from fcmae.data.contract import Crop, DataError
from fcmae.data.decoders.pil import ScaledDecoder, to_tensor
from fcmae.data.images import UNREADABLE

THREADS_VARIABLE = "FCMAE_DALI_THREADS"
PREFETCH = 2  # the pipelines' queue: batches DALI may decode ahead of the one taken


class Encoded(NamedTuple):
    """What a worker ships for one image: its file's bytes, the drawn crop, the colour mode ("RGB"
    or "L") and the name a warning gives it."""
    data: bytes
    crop: Crop
    mode: str
    name: str

    @classmethod
    def collate(cls, items):
        return EncodedBatch(items)


class EncodedBatch:
    """A micro-batch of `Encoded` images. Deliberately not a sequence, and `pin_memory` returns it
    as it is: torch's pin-memory thread would otherwise walk into the bytes."""

    def __init__(self, items):
        self.items = list(items)

    def __len__(self):
        return len(self.items)

    def __iter__(self):
        return iter(self.items)

    def pin_memory(self, device=None):
        return self


def import_dali():
    """nvidia.dali's fn and types, and the Pipeline class; ConfigError when DALI is not installed."""
    try:
        from nvidia.dali import Pipeline, fn, types
    except (ImportError, OSError) as err:
        why = "is not installed" if isinstance(err, ModuleNotFoundError) else f"cannot be imported ({err})"
        raise ConfigError(f"--decoder dali needs NVIDIA DALI, which {why} here; install it with "
                          f"pip install -e \".[dali]\"") from None
    return Pipeline, fn, types


def default_threads(gpu, num_threads=None):
    """Pipeline threads: `num_threads`, else $FCMAE_DALI_THREADS, else 4 on a GPU and 1 on a CPU."""
    value = num_threads if num_threads is not None else os.environ.get(THREADS_VARIABLE)
    if value is None:
        return 4 if gpu else 1
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if threads < 1:
        raise ConfigError(f"the dali decoder's threads ({THREADS_VARIABLE} or num_threads) must be a positive "
                          f"integer, got {value!r}")
    return threads


class Scheduled:
    """A micro-batch of `Encoded` images fed to a pipeline ahead of its step (DaliDecoder.ahead): what
    the batch's Item.image holds until `decode_batch` takes its outputs."""

    def __init__(self, items, lane):
        self.items, self.lane = list(items), lane

    def __len__(self):
        return len(self.items)

    def __iter__(self):
        return iter(self.items)

    def pin_memory(self, device=None):
        return self


class _StaleFailure(Exception):
    """An earlier batch of the pipeline failed while its outputs were being discarded."""


class Lane:
    """One pipeline and the micro-batches fed to it, oldest first; DALI runs them in that order.

    Its first schedule_run prefetches PREFETCH runs, so that many batches are fed before it; a
    batch taken before then (a stream shorter than the queue) is followed by copies of itself,
    whose outputs are dropped."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.fed = collections.deque()  # batches fed (scheduled once primed) whose outputs are not taken
        self.unscheduled = 0  # batches fed before the first schedule_run
        self.primed = False
        self.alive = True
        self.held = []  # (event, DALI's outputs) of copies on the GPU not known to have run

    def feed(self, batch):
        anchors, shapes, starts, ends = [], [], [], []
        for item in batch.items:
            top, left, height, width = item.crop.box
            anchors.append(np.array([left, top], np.int32))
            shapes.append(np.array([width, height], np.int32))
            starts.append(np.array([0, width if item.crop.flip else 0], np.float32))
            ends.append(np.array([height, 0 if item.crop.flip else width], np.float32))
        inputs = {"data": [np.frombuffer(item.data, np.uint8) for item in batch.items], "anchor": anchors,
                  "shape": shapes, "roi_start": starts, "roi_end": ends}
        for name, value in inputs.items():
            self.pipe.feed_input(name, value)  # copied into DALI's own buffer
        self.fed.append(batch)
        if self.primed:
            self.pipe.schedule_run()
            return
        self.unscheduled += 1
        if self.unscheduled == self.pipe.prefetch_queue_depth:
            self.pipe.schedule_run()  # the first: runs every batch fed so far
            self.primed = True

    def take(self, batch, device):
        """`batch`'s images (uint8 (N, H, W, C) on `device`), a copy of DALI's outputs; the outputs of
        batches fed before it and never taken are dropped. RuntimeError when DALI fails on `batch`,
        _StaleFailure when it failed on one of those."""
        while not self.primed:
            self.feed(Scheduled(batch.items, self))
        while self.fed[0] is not batch:
            self.fed.popleft()
            try:
                self.pipe.share_outputs()
                self.pipe.release_outputs()
            except RuntimeError as err:
                raise _StaleFailure(str(err)) from None
        self.fed.popleft()
        from nvidia.dali.plugin.pytorch import feed_ndarray
        if device.type != "cuda":
            out = self.pipe.share_outputs()[0].as_tensor()
            images = feed_ndarray(out, torch.empty(out.shape(), dtype=torch.uint8))  # host memory of torch's own
            self.pipe.release_outputs()
            return images
        stream = torch.cuda.current_stream(device)
        self.held = [held for held in self.held if not held[0].query()]
        outputs = self.pipe.share_outputs(cuda_stream=stream)  # ready on torch's stream; the host does not wait
        out = outputs[0].as_tensor()
        images = feed_ndarray(out, torch.empty(out.shape(), dtype=torch.uint8, device=device), cuda_stream=stream)
        copied = torch.cuda.Event()
        copied.record(stream)
        self.held.append((copied, outputs, out))  # DALI's memory stays referenced until the copy has run
        self.pipe.release_outputs()
        return images


class DaliDecoder(ScaledDecoder):
    """Pretraining's crops decoded by NVIDIA DALI in the main process, ahead of the step (see the module's text)."""
    name = "dali"
    on_device = True

    def __init__(self, num_threads=None):
        import_dali()  # stop now, with the pip command, rather than mid-run
        if num_threads is not None:
            default_threads(False, num_threads)  # checked now
        self.num_threads = num_threads
        self.pipelines = {}  # (device, output size, mode) -> the Lane of the largest batch so far

    def __getstate__(self):  # workers get the decoder too (spawn); pipelines stay in the main process
        return {**self.__dict__, "pipelines": {}}

    def crop(self, img, record, crop, mode):
        """What a worker ships: the file's bytes, the crop drawn from its header, and the mode."""
        return Encoded(record.read(), crop, mode, record.name)

    def ahead(self, batches, device):
        """The loader's `batches` (Items), each micro-batch's images fed to DALI (a `Scheduled`) before
        the micro-batch before it is handed out; an error of the loader is raised where it came,
        after the batches before it."""
        device = torch.device(device)
        pending = failure = None
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except Exception as err:  # noqa: BLE001 (a worker's DataError, say: raised after `pending`)
                failure = err
                break
            if isinstance(batch.image, EncodedBatch):
                batch = batch._replace(image=self.schedule(batch.image, device))
            if pending is not None:
                yield pending
            pending = batch
        if pending is not None:
            yield pending
        if failure is not None:
            raise failure

    def lane_key(self, items, device):
        size, mode = items[0].crop.size, items[0].mode
        if any(item.crop.size != size or item.mode != mode for item in items):
            raise ValueError("the dali decoder decodes micro-batches of one output size and colour mode")
        return device.type, device.index, tuple(size), mode

    def schedule(self, batch, device):
        """`batch` (Encoded items) fed to its pipeline: a Scheduled."""
        items = list(batch)
        key = self.lane_key(items, device)
        lane = self.pipelines.get(key)
        if lane is None or not lane.alive or lane.pipe.max_batch_size < len(items):
            lane = self.pipelines[key] = Lane(self.build(device, *key[2:], len(items)))
        scheduled = Scheduled(items, lane)
        lane.feed(scheduled)
        return scheduled

    def decode_batch(self, batch, device):
        """(uint8 images (N, H, W, C) on `device`, how many could not be decoded): a batch fed ahead
        (Scheduled) is taken, any other is fed and taken now. When DALI cannot decode the batch,
        Pillow decodes it here with the same crops; unreadable images are replaced by the next
        readable one of the batch and counted."""
        device = torch.device(device)
        for _ in range(2):
            fed = isinstance(batch, Scheduled) and batch.lane.alive and any(b is batch for b in batch.lane.fed)
            scheduled = batch if fed else self.schedule(batch, device)
            lane = scheduled.lane
            try:
                return lane.take(scheduled, device), 0
            except _StaleFailure:  # a batch fed before it failed: the pipeline is gone; a new one decodes this one
                self.retire(lane)
                batch = scheduled.items
            except RuntimeError as err:  # DALI's "Critical error in pipeline": the pipeline is no longer valid
                self.retire(lane)
                sample = re.search(r"Failed to decode sample #(\d+)", str(err))
                items = scheduled.items
                which = items[int(sample.group(1))].name if sample and int(sample.group(1)) < len(items) else "an image"
                warnings.warn(f"DALI could not decode {which}; decoding its micro-batch with Pillow", stacklevel=2)
                return self.fallback(items, device)
        raise AssertionError("unreachable: a new pipeline holds no earlier batch")

    def retire(self, lane):
        """`lane`'s pipeline is no longer used; batches still fed to it are fed again to a new one."""
        lane.alive = False
        for key, kept in list(self.pipelines.items()):
            if kept is lane:
                del self.pipelines[key]

    def build(self, device, size, mode, max_batch):
        """The pipeline: external source (bytes, box, flip) -> ROI decode -> cubic resize, HWC."""
        Pipeline, fn, types = import_dali()
        gpu = device.type == "cuda"
        device_id = (device.index if device.index is not None else torch.cuda.current_device()) if gpu else None
        # the dynamic executor: outputs live as long as they are referenced (see Lane.take)
        pipe = Pipeline(batch_size=max_batch, num_threads=default_threads(gpu, self.num_threads),
                        device_id=device_id, prefetch_queue_depth=PREFETCH, exec_dynamic=True)
        with pipe:
            data = fn.external_source(name="data", dtype=types.UINT8, ndim=1)
            anchor = fn.external_source(name="anchor", dtype=types.INT32, ndim=1)  # (x, y) of the box
            shape = fn.external_source(name="shape", dtype=types.INT32, ndim=1)  # (width, height)
            roi_start = fn.external_source(name="roi_start", dtype=types.FLOAT, ndim=1)  # (y, x) in the box
            roi_end = fn.external_source(name="roi_end", dtype=types.FLOAT, ndim=1)
            images = fn.decoders.image_slice(
                data, anchor, shape, device="mixed" if gpu else "cpu",
                output_type=types.RGB if mode == "RGB" else types.GRAY,
                adjust_orientation=False)  # as Pillow opens it: the box was drawn on the stored orientation
            # a region with start > end in x is mirrored: the flip costs nothing
            images = fn.resize(images, size=list(size), interp_type=types.INTERP_CUBIC, antialias=True,
                               roi_start=roi_start, roi_end=roi_end)
            pipe.set_outputs(images)
        pipe.build()
        return pipe

    def fallback(self, items, device):
        """The batch decoded by Pillow (ScaledDecoder's crop path, the same crops); see decode_batch."""
        images = []
        for item in items:
            try:
                with Image.open(io.BytesIO(item.data)) as img:
                    images.append(to_tensor(self.crop_pil(img, item.crop, item.mode)))
            except UNREADABLE as err:
                warnings.warn(f"skipping unreadable image {item.name}: {err}", stacklevel=3)
                images.append(None)
        readable = [i for i, image in enumerate(images) if image is not None]
        if not readable:
            raise DataError(f"no image of a micro-batch of {len(items)} is readable (the first is {items[0].name})")
        stand_ins = [image if image is not None else images[next((j for j in readable if j > i), readable[0])]
                     for i, image in enumerate(images)]
        return torch.stack(stand_ins).to(device), len(items) - len(readable)
