"""The input pipeline: the dataset contract, crops drawn before decoding, scaled JPEG decoding,
uint8 shipping with normalisation on the device, unusual and broken images, persistent loaders."""
import io
import math
import os

import pytest
import torch
from PIL import Image
from timm.data import create_transform
from torchvision import transforms

from fcmae.config import ConfigError
from fcmae.data import (
    DECODERS, EvalTransform, FinetuneTransform, FolderSource, FullDecoder, Images, PretrainTransform, ScaledDecoder,
    Source, TrainSampler, WithMasks, collate, derive_seed, eval_transform, get_decoder, normalization, open_images,
    open_source, seeded, write_shards,
)
from fcmae.data.folders import sample_photographs
from fcmae.models import random_patch_mask
from test_pretrain import make_images

CPU_DECODERS = [name for name in DECODERS if name != "dali"]  # dali: tests/test_dali.py


def photo(name):
    """One of scikit-image's photographs, as RGB."""
    return Image.open(next(p for p in sample_photographs() if p.endswith(name))).convert("RGB")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Real photographs as JPEGs, some large enough for every DCT reduction at 64 px, and a PNG."""
    folder = tmp_path_factory.mktemp("photos")
    for i, (name, size) in enumerate([("astronaut.png", 512), ("coffee.png", 1200), ("chelsea.png", 900),
                                      ("motorcycle_left.png", 1600), ("rocket.jpg", 640)]):
        img = photo(name)
        img = img.resize((size, round(size * img.height / img.width)), Image.BICUBIC)
        img.save(folder / f"{i:02d}_{name.split('.')[0]}.jpg", quality=92)
    photo("ihc.png").save(folder / "05_ihc.png")
    return folder


def old_pretrain_item(path, seed, epoch, index, size):
    """What pretraining computed for an image before decoders existed: the whole image decoded,
    torchvision's RandomResizedCrop (bicubic, scale 0.2-1) and flip, ToTensor and Normalize, all
    drawn inside the sample's seeded block."""
    mean, std = normalization(3)
    old = transforms.Compose([
        transforms.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(), transforms.Normalize(mean, std)])
    with Image.open(path) as img:
        img = img.convert("RGB")
    with seeded(derive_seed(seed, "sample", epoch, index)):
        return old(img)


def batch_of(dataset, keys):
    return collate(dataset.__getitems__(keys))


class CropSpy(ScaledDecoder):
    """The scaled decoder, remembering every crop it was asked for."""

    def __init__(self):
        self.crops = []

    def crop(self, img, record, crop, mode):
        self.crops.append(crop)
        return super().crop(img, record, crop, mode)


# ----- the contract --------------------------------------------------------------------------------

def test_sources_and_samplers_satisfy_the_contract(photos, tmp_path):
    write_shards(photos, tmp_path / "s", per_shard=2, say=lambda _: None)
    for path in (photos, tmp_path / "s", None):
        source = open_source(path)
        assert isinstance(source, Source)
        assert isinstance(source.batch_sampler(2, 1, 1, 0, seed=0), TrainSampler)
    assert type(open_source(None)) is FolderSource and "sample photographs" in open_source(None).where
    with pytest.raises(ConfigError, match="--repeats works with folders of images and Hugging Face datasets, not "
                                          "with .*index.json; write"):
        open_images(tmp_path / "s", PretrainTransform(32), repeats=2)


def test_items_and_batches_are_one_type_for_pretraining_and_fine_tuning(photos):
    labelled = make_images(photos.parent / "labelled", count=4, size=48)
    mean, std = normalization(3)
    pretraining = WithMasks(open_images(photos, PretrainTransform(32)), num_patches=1, mask_ratio=0.0, seed=0)
    finetuning = open_images(labelled, FinetuneTransform(32, mean, std), labelled=True)
    evaluation = open_images(labelled, EvalTransform(32, mean, std), labelled=True)
    shipped = {torch.uint8: (2, 32, 32, 3), torch.float32: (2, 3, 32, 32)}  # uint8 channels last
    for dataset, dtype in ((pretraining, torch.uint8), (finetuning, torch.float32), (evaluation, torch.uint8)):
        batch = batch_of(dataset, [(0, 0, 0), (1, 0, 1)])
        assert type(batch) is type(dataset.__getitems__([(0, 0, 0)])[0])  # Item, batched or not
        assert batch.image.dtype == dtype and batch.image.shape == shipped[dtype]
        assert batch.label.dtype == torch.long and batch.skipped.tolist() == [0, 0]
        images, skipped = dataset.prepare(batch, torch.device("cpu"))
        assert images.dtype == torch.float32 and images.shape == (2, 3, 32, 32) and images.is_contiguous()
        assert skipped == 0
    assert batch_of(pretraining, [(0, 0, 0)]).label.tolist() == [-1]  # unlabelled
    assert batch_of(pretraining, [(0, 0, 0)]).mask.shape == (1, 1)
    assert batch_of(finetuning, [(0, 0, 0), (3, 0, 1)]).label.tolist() == [0, 1]  # class folders a, a, b, b


def test_a_new_source_is_one_class_in_the_registry(monkeypatch):
    """What the registry asks of a source: claims, open; the rest is the contract."""
    from fcmae.data import registry

    class Numbers(FolderSource):
        @classmethod
        def claims(cls, data_path):
            return str(data_path).startswith("numbers:")

        @classmethod
        def open(cls, data_path, labelled=False, flag="--data_path", selection=None):
            return cls(sample_photographs()[:3], where=data_path)

    monkeypatch.setattr(registry, "SOURCES", (Numbers, *registry.SOURCES))
    assert open_images("numbers:3", PretrainTransform(32)).source.where == "numbers:3"


# ----- same seed, same crops, flips, masks; uint8 equals the float path ----------------------------

@pytest.mark.parametrize("decoder", CPU_DECODERS)
def test_pretraining_batches_equal_the_float_path_of_before(decoder, tmp_path):
    """Images too small for a reduced decode: every decoder gives exactly the old float values
    (same boxes, flips and pixels; uint8 plus normalisation on the device = ToTensor + Normalize)."""
    data = make_images(tmp_path / "d", count=6, size=80)
    for p in list(data.rglob("*.png"))[:3]:  # JPEGs too
        Image.open(p).save(p.with_suffix(".jpg"), quality=90)
        p.unlink()
    dataset = open_images(data, PretrainTransform(64), seed=3, decoder=get_decoder(decoder))
    keys = [(i, 2, i) for i in range(len(dataset))]
    images, _ = dataset.prepare(batch_of(dataset, keys), torch.device("cpu"))
    old = torch.stack([old_pretrain_item(dataset.source.files[i], 3, 2, i, 64) for i in range(len(dataset))])
    assert torch.equal(images, old)


def test_scaled_decoding_draws_the_same_crops_and_flips(photos):
    spies = {name: CropSpy() for name in ("full", "scaled")}
    spies["full"].reduce = FullDecoder().reduce  # decode every pixel, remember the crops
    for name, spy in spies.items():
        dataset = open_images(photos, PretrainTransform(64), seed=1, decoder=spy)
        dataset.__getitems__([(i, e, i) for e in range(3) for i in range(len(dataset))])
    assert spies["full"].crops == spies["scaled"].crops and len(spies["full"].crops) == 18
    assert any(c.flip for c in spies["full"].crops) and not all(c.flip for c in spies["full"].crops)


def test_masks_come_from_the_epoch_and_position():
    dataset = WithMasks(open_images(None, PretrainTransform(64)), num_patches=4, mask_ratio=0.5, seed=9)
    for key in [(0, 0, 0), (3, 1, 7), (3, 2, 7)]:
        expected = random_patch_mask(1, 4, 0.5, generator=torch.Generator().manual_seed(
            derive_seed(9, "mask", key[1], key[2])))[0]
        assert torch.equal(dataset.mask(key), expected)
    assert not all(torch.equal(dataset.mask((0, 0, p)), dataset.mask((0, 0, 0))) for p in range(1, 9))


@pytest.mark.parametrize("aa,interpolation", [("rand-m9-mstd0.5-inc1", "bicubic"), (None, "random")])
def test_fine_tuning_transform_equals_timm_s(aa, interpolation, tmp_path):
    """The crop and flip drawn before decoding, then RandAugment / colour jitter, normalisation and
    random erasing: with every pixel decoded, exactly timm's composed transform."""
    data = make_images(tmp_path / "d", count=4, size=80)
    mean, std = normalization(3)
    new = FinetuneTransform(64, mean, std, aa, 0.4, interpolation, reprob=0.5)
    old = create_transform(64, is_training=True, auto_augment=aa, color_jitter=0.4, interpolation=interpolation,
                           re_prob=0.5, re_mode="pixel", mean=mean, std=std)
    dataset = open_images(data, new, seed=5, decoder=FullDecoder(), labelled=True)
    for i, path in enumerate(dataset.source.files):
        with seeded(derive_seed(5, "sample", 4, i)):
            expected = old(Image.open(path).convert("RGB"))
        assert torch.equal(dataset[(i, 4, 0)].image, expected)


@pytest.mark.parametrize("size", [64, 384])
def test_evaluation_ships_uint8_equal_to_the_float_transform(size, tmp_path):
    data = make_images(tmp_path / "d", count=3, size=100)
    mean, std = normalization(3)
    dataset = open_images(data, EvalTransform(size, mean, std), decoder=FullDecoder(), labelled=True)
    images, _ = dataset.prepare(batch_of(dataset, [(i, 0, 0) for i in range(3)]), torch.device("cpu"))
    old = eval_transform(size, mean, std)
    assert torch.equal(images, torch.stack([old(Image.open(p).convert("RGB")) for p in dataset.source.files]))


# ----- scaled decoding: how far from full decoding -------------------------------------------------

def psnr(a, b):
    mse = ((a.double() - b.double()) ** 2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse)


def test_scaled_decoding_stays_within_the_stated_deviation(photos):
    """docs/data.md: on photographs, crops decoded at 1/2, 1/4 or 1/8 scale differ from full decoding by
    less than 2 levels in 255 on average at every reduction (measured: 0.4 to 1.6), and no crop
    by more than a PSNR of 32 dB (measured: the worst at 34 to 36 dB)."""
    transform = PretrainTransform(64)
    errors = {}  # reduction -> list of |scaled - full| per crop
    for index, path in enumerate(sorted(p for p in photos.iterdir() if p.suffix == ".jpg")):
        data = path.read_bytes()
        for k in range(8):
            with seeded(derive_seed(0, "sample", k, index)), Image.open(io.BytesIO(data)) as img:
                crop = transform.plan(img)
            top, left, h, w = crop.box
            with Image.open(io.BytesIO(data)) as img:
                reduction = ScaledDecoder().reduce(img, min(w / 64, h / 64))
            full, scaled = (decoder.crop(Image.open(io.BytesIO(data)), None, crop, "RGB")
                            for decoder in (FullDecoder(), ScaledDecoder()))
            errors.setdefault(reduction, []).append((scaled.double() - full.double()).abs())
            assert psnr(scaled, full) > 32, (path.name, reduction)
    assert {2, 4, 8} <= errors.keys()  # every reduction exercised
    assert all(torch.cat([e.flatten() for e in errors[r]]).mean() < 2.0 for r in (2, 4, 8))
    assert all(e.max() == 0 for e in errors.get(1, []))  # no reduction: exactly the full decode


# ----- unusual and broken images, through every decoder --------------------------------------------

@pytest.fixture(scope="module")
def odd_images(tmp_path_factory):
    """Readable images that are not plain RGB baseline JPEGs, large enough to be decoded at reduced
    scale, and unreadable files: {name: readable}."""
    folder = tmp_path_factory.mktemp("odd")
    big = photo("coffee.png").resize((1200, 800), Image.BICUBIC)
    big.convert("CMYK").save(folder / "cmyk.jpg", quality=90)
    big.convert("L").save(folder / "grey.jpg", quality=90)
    big.save(folder / "progressive.jpg", quality=90, progressive=True)
    big.save(folder / "subsampling444.jpg", quality=90, subsampling=0)
    big.convert("RGBA").save(folder / "rgba.png")
    big.convert("P").save(folder / "palette.png")
    good = (folder / "progressive.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[:len(good) // 3])
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff" + os.urandom(2000))
    (folder / "notes.jpg").write_text("not an image")
    return folder


@pytest.mark.parametrize("decoder", CPU_DECODERS)
@pytest.mark.parametrize("in_chans", [3, 1])
def test_unusual_and_broken_images_through_every_decoder(odd_images, decoder, in_chans):
    dataset = open_images(odd_images, PretrainTransform(64, in_chans), decoder=get_decoder(decoder))
    names = [os.path.basename(f) for f in dataset.source.files]
    with pytest.warns(UserWarning, match="skipping unreadable image") as warned:
        batch = batch_of(dataset, [(i, 0, i) for i in range(len(names))])
    said = " ".join(str(w.message) for w in warned)
    unreadable = ("corrupt.jpg", "notes.jpg", "truncated.jpg")
    assert all(name in said for name in unreadable)
    assert batch.image.shape == (len(names), 64, 64, in_chans) and batch.image.dtype == torch.uint8
    assert int(batch.skipped.sum()) == 3  # each stood in for by the next file, none of them unreadable
    if decoder == "scaled":  # the readable odd JPEGs are decoded at reduced scale, close to the full decode
        full = open_images(odd_images, PretrainTransform(64, in_chans), decoder=FullDecoder())
        with pytest.warns(UserWarning):
            reference = batch_of(full, [(i, 0, i) for i in range(len(names))])
        for i, name in enumerate(names):
            if name.endswith(".jpg") and name not in unreadable:
                assert psnr(batch.image[i], reference.image[i]) > 30, name


def test_a_batch_with_no_readable_image_is_one_sentence(odd_images, tmp_path):
    from fcmae.data import DataError
    folder = tmp_path / "bad"
    folder.mkdir()
    for name in ("notes.jpg", "corrupt.jpg"):
        (folder / name).write_bytes((odd_images / name).read_bytes())
    dataset = open_images(folder, PretrainTransform(64))
    with pytest.warns(UserWarning), pytest.raises(DataError, match="no image of a micro-batch of 2 .* is readable"):
        dataset.__getitems__([(0, 0, 0), (1, 0, 1)])


# ----- loaders --------------------------------------------------------------------------------------

def test_evaluation_loaders_keep_their_workers(tmp_path):
    import importlib.util
    from pathlib import Path
    from fcmae.config import parse_with_config
    from fcmae.training.engine import Run

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("finetune", root / "finetune.py")
    finetune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(finetune)
    data = make_images(tmp_path / "d", count=6, size=40)
    args = parse_with_config(finetune.get_args_parser(), ["--data_path", str(data), "--num_workers", "1",
                                                          "--output_dir", "", "--log_with", "none", "--batch_size", "2"])
    run = Run(args, "test")
    mean, std = normalization(3)
    dataset = open_images(data, EvalTransform(32, mean, std), labelled=True)

    class Pids(Images):
        def __getitems__(self, keys):
            return [item._replace(label=os.getpid()) for item in super().__getitems__(keys)]

    dataset.__class__ = Pids
    served = [{pid for batch in run.evaluation_loader(dataset) for pid in batch.label.tolist()} for _ in range(3)]
    assert run.evaluation_loader(dataset) is run.evaluation_loader(dataset)
    assert len(served[0]) == 1 and served[0] == served[1] == served[2] and os.getpid() not in served[0]
    assert sum(len(batch.label) for batch in run.evaluation_loader(dataset)) == 6
