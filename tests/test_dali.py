"""--decoder dali (fcmae/data/decoders/dali.py) on this machine's CPU: DALI's CPU pipeline is the GPU's
pipeline with libjpeg-turbo in place of nvJPEG, so these check the crops, flips, modes, bad files
and resume of the GPU path, and its pixels against Pillow's.

Measured here (DALI 2.4.0, Pillow's libjpeg-turbo; 60 crops of the scikit-image photographs saved
as JPEG at half, full and 2048 px size, to 64 and 224 px): against the `full` decoder, the mean
absolute error is 0.13-0.16 levels of 255 (at most 0.23 for one image) and the PSNR 55.5-56.4 dB
(at least 52.6 dB for one image). Greyscale from files that are not greyscale JPEG or YCbCr JPEG
(PNG, CMYK) is darker by about 0.4 levels (DALI's RGB to grey conversion truncates where Pillow
rounds): up to 0.54 levels, 49.8 dB for one image. The bounds below leave about 3x margin on the
mean error, and 2x on one image's. On the GPU (nvJPEG, the hardware decoder) the deviation is not
measured yet.
"""
import io
import os
import pickle
import sys
import warnings

import numpy as np
import pytest
import skimage
import torch
from PIL import Image

from fcmae.config import ConfigError
from fcmae.data import DataError, FullDecoder, PretrainTransform, Record, ScaledDecoder, get_decoder
from fcmae.data.decoders.dali import Encoded, EncodedBatch, default_threads  # none of these imports DALI
from test_pretrain import SMALL, final_params, kill_at_checkpoint, run_pretrain

SKIMAGE = os.path.dirname(skimage.data.__file__)
PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "retina.jpg", "hubble_deep_field.jpg",
          "motorcycle_left.png"]
MAE, PSNR = 0.5, 48.0              # the whole batch: mean absolute error (levels of 255), dB
MAE_IMAGE, PSNR_IMAGE = 1.0, 45.0  # each image


def jpeg(img, **options):
    return encoded(img, "JPEG", quality=90, **options)


def encoded(img, kind, **options):
    out = io.BytesIO()
    img.save(out, kind, **options)
    return out.getvalue()


def photo(name):
    return Image.open(os.path.join(SKIMAGE, name)).convert("RGB")


@pytest.fixture(scope="module")
def photos():
    """The photographs as JPEG bytes at half and full size, and one at 2048x2048 (a large file)."""
    out = {}
    for name in PHOTOS:
        img = photo(name)
        out[f"{name}@1"] = jpeg(img)
        out[f"{name}@0.5"] = jpeg(img.resize((img.width // 2, img.height // 2), Image.BICUBIC))
    out["retina@2048"] = jpeg(photo("retina.jpg").resize((2048, 2048), Image.BICUBIC))
    return out


@pytest.fixture(scope="module")
def dali():
    """The decoder; every test that needs DALI asks for it, and is skipped where DALI is absent (CI,
    which sets CI=true and installs the test extra, fails instead)."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        message = "NVIDIA DALI is not installed (pip install -e '.[dali]')"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    return get_decoder("dali")


def encode(decoder, named_bytes, size, mode="RGB", seed=0, flip=None):
    """What the workers ship: each image's crop drawn as PretrainTransform draws it (flip forced if asked)."""
    transform = PretrainTransform(size, 3 if mode == "RGB" else 1)
    torch.manual_seed(seed)
    items = []
    for name, data in named_bytes:
        record = Record(0, None, name, data=data)
        with record.open() as img:
            crop = transform.plan(img)
            crop = crop if flip is None else crop._replace(flip=flip)
            items.append(decoder.crop(img, record, crop, mode))
    return items


def pillow(items, decoder=None):
    """The same crops decoded by Pillow (the `full` decoder unless another is given)."""
    decoder = decoder or FullDecoder()
    out = []
    for item in items:
        with Image.open(io.BytesIO(item.data)) as img:
            out.append(decoder.crop(img, None, item.crop, item.mode))
    return torch.stack(out)


def assert_close_to_pillow(images, reference):
    assert images.shape == reference.shape and images.dtype == reference.dtype == torch.uint8
    diff = images.double() - reference.double()
    per_image = diff.abs().mean(dim=(1, 2, 3))
    psnr = 10 * torch.log10(255 ** 2 / diff.square().mean(dim=(1, 2, 3)).clamp_min(1e-12))
    batch_psnr = 10 * torch.log10(255 ** 2 / diff.square().mean())
    assert diff.abs().mean() < MAE and batch_psnr > PSNR, (diff.abs().mean(), batch_psnr)
    assert per_image.max() < MAE_IMAGE and psnr.min() > PSNR_IMAGE, (per_image.max(), psnr.min())


@pytest.mark.parametrize("size", [64, 224])
def test_crops_agree_with_pillow_on_photographs(dali, photos, size):
    items = encode(dali, list(photos.items()) * 2, size, seed=size)
    images, failed = dali.decode_batch(Encoded.collate(items), "cpu")
    assert failed == 0
    assert images.dtype == torch.uint8 and images.shape == (len(items), size, size, 3)
    assert_close_to_pillow(images, pillow(items))
    again, _ = get_decoder("dali").decode_batch(Encoded.collate(items), "cpu")  # a fresh pipeline too
    assert torch.equal(again, images)  # deterministic: what exact resume rests on


def test_flips_and_greyscale(dali, photos):
    named = list(photos.items())
    plain, _ = dali.decode_batch(Encoded.collate(encode(dali, named, 64, flip=False)), "cpu")
    flipped_items = encode(dali, named, 64, flip=True)
    flipped, _ = dali.decode_batch(Encoded.collate(flipped_items), "cpu")
    assert_close_to_pillow(flipped, pillow(flipped_items))
    # the flip is a mirrored resize region: the mirror image up to rounding
    assert (flipped.int() - plain.flip(2).int()).abs().max() <= 1
    grey_items = encode(dali, named, 64, mode="L")
    grey, failed = dali.decode_batch(Encoded.collate(grey_items), "cpu")
    assert failed == 0 and grey.shape == (len(named), 64, 64, 1) and grey.dtype == torch.uint8
    assert_close_to_pillow(grey, pillow(grey_items))


def odd_files():
    """(name, bytes) of files a folder of photographs may hold; the unreadable ones have intact headers."""
    img = photo("astronaut.png")
    good = jpeg(img)
    noise = np.random.default_rng(0).integers(0, 256, 6000, dtype=np.uint8).tobytes()
    rotated = img.getexif()
    rotated[0x0112] = 6  # EXIF orientation: Pillow does not apply it, and neither may DALI
    return {
        "cmyk.jpg": jpeg(img.convert("CMYK")),
        "grey.jpg": jpeg(img.convert("L")),
        "photo.png": encoded(img, "PNG"),
        "rgba.png": encoded(img.convert("RGBA"), "PNG"),
        "palette.png": encoded(img.convert("P"), "PNG"),
        "subsampling444.jpg": jpeg(img, subsampling=0),
        "progressive.jpg": jpeg(photo("coffee.png"), progressive=True),
        "rotated.jpg": jpeg(photo("coffee.png"), exif=rotated),
        "truncated.jpg": good[: len(good) // 2],
        "corrupt.jpg": good[:1000] + noise + good[7000:],
    }


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_odd_files_go_through(dali, mode):
    files = odd_files()
    readable = [(name, data) for name, data in files.items() if name not in ("truncated.jpg", "corrupt.jpg")]
    items = encode(dali, readable, 64, mode)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # all decoded by DALI: no fallback to Pillow
        images, failed = dali.decode_batch(Encoded.collate(items), "cpu")
        assert failed == 0 and images.shape == (len(items), 64, 64, 3 if mode == "RGB" else 1)
        assert_close_to_pillow(images, pillow(items))
        # damaged but complete entropy-coded data: libjpeg-turbo in DALI decodes it (Pillow refuses it, below)
        items = encode(dali, [("corrupt.jpg", files["corrupt.jpg"]), ("grey.jpg", files["grey.jpg"])], 64)
        assert dali.decode_batch(Encoded.collate(items), "cpu")[1] == 0


def test_unreadable_images_are_replaced_by_the_next_readable_and_counted(dali):
    files = odd_files()
    order = ["truncated.jpg", "cmyk.jpg", "corrupt.jpg", "grey.jpg", "photo.png", "progressive.jpg"]
    items = encode(dali, [(name, files[name]) for name in order], 64)
    with pytest.warns(UserWarning) as caught:
        images, failed = dali.decode_batch(Encoded.collate(items), "cpu")
    messages = " ".join(str(w.message) for w in caught)
    assert "DALI could not decode truncated.jpg; decoding its micro-batch with Pillow" in messages
    assert "skipping unreadable image truncated.jpg" in messages and "corrupt.jpg" in messages
    assert failed == 2
    # the batch falls back to Pillow's scaled path with the same crops; a bad image takes the next good one's
    good = [i for i, name in enumerate(order) if name not in ("truncated.jpg", "corrupt.jpg")]
    reference = pillow([items[i] for i in good], ScaledDecoder())
    expected = [reference[good.index(next(j for j in good if j > i))] if i not in good else reference[good.index(i)]
                for i in range(len(order))]
    assert torch.equal(images, torch.stack(expected))
    # the pipeline is built afresh after the failure and decodes the next batch
    again, failed = dali.decode_batch(Encoded.collate([items[i] for i in good]), "cpu")
    assert failed == 0 and again.shape == (len(good), 64, 64, 3)


def test_a_batch_without_one_readable_image_stops_with_one_sentence(dali):
    files = odd_files()
    items = encode(dali, [("truncated.jpg", files["truncated.jpg"]), ("corrupt.jpg", files["corrupt.jpg"])], 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match=r"^no image of a micro-batch of 2 is readable \(the first is "
                                            r"truncated.jpg\)$"):
            dali.decode_batch(Encoded.collate(items), "cpu")


def test_batches_pickle_and_skip_pin_memory(dali, photos):
    items = encode(dali, list(photos.items())[:3], 64)
    batch = Encoded.collate(items)
    assert isinstance(batch, EncodedBatch) and batch.pin_memory() is batch and len(batch) == 3
    assert list(pickle.loads(pickle.dumps(batch))) == items
    decoder = pickle.loads(pickle.dumps(dali))  # what a spawned worker gets: no pipeline
    assert decoder.pipelines == {} and decoder.on_device and decoder.name == "dali"
    # a larger batch than the cached pipeline's builds a larger one
    dali.decode_batch(batch, "cpu")
    images, _ = dali.decode_batch(Encoded.collate(items * 3), "cpu")
    assert images.shape == (9, 64, 64, 3)


def test_without_dali_the_decoder_asks_for_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # an import of it now fails as if it were absent
    with pytest.raises(ConfigError, match=r'^--decoder dali needs NVIDIA DALI, which is not installed here; '
                                          r'install it with pip install -e "\.\[dali\]"$'):
        get_decoder("dali")


def test_thread_count_is_checked(dali, monkeypatch):
    monkeypatch.delenv("FCMAE_DALI_THREADS", raising=False)
    assert default_threads(gpu=True) == 4 and default_threads(gpu=False) == 1
    monkeypatch.setenv("FCMAE_DALI_THREADS", "3")
    assert default_threads(gpu=False) == 3 and default_threads(gpu=False, num_threads=2) == 2
    monkeypatch.setenv("FCMAE_DALI_THREADS", "none")
    with pytest.raises(ConfigError, match="FCMAE_DALI_THREADS or num_threads"):
        default_threads(gpu=False)
    with pytest.raises(ConfigError, match="got 0"):
        get_decoder("dali", num_threads=0)


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    """24 small JPEG photographs (crops of the scikit-image ones) in two class folders."""
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    for i in range(24):
        img = photo(PHOTOS[i % len(PHOTOS)])
        left, top = int(rng.integers(0, img.width - 200)), int(rng.integers(0, img.height - 200))
        sub = root / "ab"[i % 2]
        sub.mkdir(exist_ok=True)
        img.crop((left, top, left + 200, top + 160)).resize((100, 80), Image.BICUBIC).save(sub / f"{i:03d}.jpg")
    return root


@pytest.mark.slow
def test_pretraining_with_dali_runs_and_resumes_bitwise(dali, jpeg_folder, tmp_path):
    args = [*SMALL, "--num_workers", "1", "--decoder", "dali", "--device", "cpu",
            "--data_path", jpeg_folder]
    result = run_pretrain(*args, "--output_dir", tmp_path / "straight")
    assert "done after 12 steps" in result.stdout
    assert (tmp_path / "straight" / "checkpoints" / "checkpoint-00000012" / "model.safetensors").is_file()

    out = tmp_path / "killed"
    kill_at_checkpoint(args, out, step=8)  # mid-epoch 2 of 2 (SMALL)
    assert "resumed from" in run_pretrain(*args, "--output_dir", out, "--save_ckpt_steps", "1").stdout
    straight, resumed = final_params(tmp_path / "straight"), final_params(out)
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key  # DALI decodes a given batch the same every time
    assert (out / "log.txt").read_text() == (tmp_path / "straight" / "log.txt").read_text()


# ----- decoding ahead of the step --------------------------------------------------------------------

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


def loader_batches(items_per_batch):
    """What a loader yields for pretraining with the dali decoder: Items whose images are EncodedBatches."""
    from fcmae.data import Item
    for i, items in enumerate(items_per_batch):
        yield Item(Encoded.collate(items), torch.full((len(items),), i), torch.zeros(len(items), dtype=torch.long))


@pytest.mark.parametrize("device", DEVICES)
def test_a_decode_is_not_changed_by_the_next_one(dali, photos, device):
    """Two batches fed to the pipeline before either is taken, then taken one after the other: the
    first one's images (copied out of DALI's buffers) stay what they were once the second is
    decoded, and both are Pillow's crops. On CUDA torch's stream is held back before the first
    copy, so a copy that could race with DALI's next run would read the second batch's pixels."""
    named = list(photos.items())
    first, second = encode(dali, named, 64, seed=1), encode(dali, named, 64, seed=2)
    assert [a.crop for a in first] != [b.crop for b in second]
    batches = dali.ahead(loader_batches([first, second]), device)
    a = next(batches)
    b = next(batches)  # both fed now
    if device == "cuda":
        torch.cuda._sleep(1_000_000_000)  # about half a second of GPU time before the copy can run
    images_a, failed_a = dali.decode_batch(a.image, device)
    kept = images_a.clone()
    images_b, failed_b = dali.decode_batch(b.image, device)
    images_again, _ = dali.decode_batch(Encoded.collate(first), device)  # and once more, fed and taken at once
    assert failed_a == failed_b == 0
    assert torch.equal(images_a, kept) and torch.equal(images_again, images_a)
    assert_close_to_pillow(images_a.cpu(), pillow(first))
    assert_close_to_pillow(images_b.cpu(), pillow(second))


def test_the_next_batch_is_fed_and_scheduled_when_one_is_handed_out(dali, photos, monkeypatch):
    named = list(photos.items())[:4]
    batches = [encode(dali, named, 64, seed=s) for s in range(4)]
    decoder = get_decoder("dali")  # its own pipelines, built here
    fed, runs = [], []  # batches fed to DALI; how many had been fed at each schedule_run
    build = type(decoder).build

    def spied(self, *args):
        pipe = build(self, *args)
        feed_input, schedule_run = pipe.feed_input, pipe.schedule_run

        def feeding(name, data):
            if name == "data":
                fed.append(len(data))
            return feed_input(name, data)

        def scheduling():
            runs.append(len(fed))
            return schedule_run()

        monkeypatch.setattr(pipe, "feed_input", feeding)
        monkeypatch.setattr(pipe, "schedule_run", scheduling)
        return pipe

    monkeypatch.setattr(type(decoder), "build", spied)
    taken = []

    def loader():
        for batch in loader_batches(batches):
            taken.append(batch)
            yield batch

    decoded = []
    for k, batch in enumerate(decoder.ahead(loader(), "cpu")):
        assert batch.image.lane.pipe.prefetch_queue_depth >= 2
        # when batch k is handed out, batch k + 1 is taken from the loader, fed and its run scheduled:
        # DALI's first schedule_run runs the first two batches, each later one the next batch
        ahead = min(k + 2, len(batches))
        assert len(taken) == len(fed) == ahead and runs == list(range(2, ahead + 1))
        decoded.append(decoder.decode_batch(batch.image, "cpu")[0])
    assert len(runs) == len(batches) - 1 and len(fed) == len(batches)  # no batch decoded twice
    for items, images in zip(batches, decoded):
        assert torch.equal(images, get_decoder("dali").decode_batch(Encoded.collate(items), "cpu")[0])


def test_decoding_ahead_keeps_the_fallback_and_the_loader_s_errors_in_place(dali, photos):
    files = odd_files()
    good = encode(dali, list(photos.items())[:3], 64)
    bad = encode(dali, [("truncated.jpg", files["truncated.jpg"]), *list(photos.items())[:2]], 64)

    def failing():
        yield from loader_batches([good, bad, good])
        raise DataError("the shard x cannot be read")

    batches = dali.ahead(failing(), "cpu")
    first = next(batches)
    images, failed = dali.decode_batch(first.image, "cpu")  # fed beside a batch DALI cannot decode
    assert failed == 0
    assert torch.equal(images, get_decoder("dali").decode_batch(Encoded.collate(good), "cpu")[0])
    second = next(batches)
    with pytest.warns(UserWarning) as caught:
        images, failed = dali.decode_batch(second.image, "cpu")
    messages = " ".join(str(w.message) for w in caught)
    assert "DALI could not decode truncated.jpg; decoding its micro-batch with Pillow" in messages
    assert failed == 1 and images.shape == (3, 64, 64, 3)
    third = next(batches)  # fed to the failed pipeline: decoded by a new one
    assert dali.decode_batch(third.image, "cpu")[1] == 0
    with pytest.raises(DataError, match="the shard x cannot be read"):  # after the batches before it
        next(batches)
    # a batch skipped over (never taken) that fails does not fail the one after it
    batches = dali.ahead(loader_batches([bad, good]), "cpu")
    skipped, kept = next(batches), next(batches)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to say: the failed batch is never used
        images, failed = dali.decode_batch(kept.image, "cpu")
    assert failed == 0 and torch.equal(images, get_decoder("dali").decode_batch(Encoded.collate(good), "cpu")[0])
