"""python -m fcmae.reconstruct: the picture pretrain.py draws, from any checkpoint with a decoder."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import fcmae
from fcmae.visualize import reconstruction_grid
from test_pretrain import ROOT, SMALL, env, make_images, run_pretrain
from test_weights import minkowski_checkpoint


def reconstruct(*args):
    return subprocess.run([sys.executable, "-m", "fcmae.reconstruct", *map(str, args)], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A checkpoint and an encoder file written by a short pretrain.py run (decoder 2 x 64)."""
    root = tmp_path_factory.mktemp("recon")
    images = make_images(root / "images", count=8)
    out = root / "run"
    run_pretrain(*SMALL, "--epochs", "1", "--decoder_depth", "2", "--data_path", images, "--output_dir", out)
    return images, out


def test_a_checkpoint_gives_one_row_per_image_as_pretrain_draws(pretrained, tmp_path):
    images, out = pretrained
    checkpoint = sorted((out / "checkpoints").glob("checkpoint-*"))[-1]
    files = [images / "a" / "img_000.png", images / "b" / "img_001.png", images / "a" / "img_002.png"]
    result = reconstruct(checkpoint, *files, "--input_size", "64", "--output", tmp_path / "grid.png", "--seed", "4")
    assert result.returncode == 0, result.stderr
    assert "3 image(s), convnextv2_atto, 64 px, 3 of 4 patches masked" in result.stdout
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    # make_grid: 3 rows x 3 columns of 64 px pictures with 2 px padding
    assert grid.shape[:2] == (3 * 66 + 2, 3 * 66 + 2)
    # the same seed gives the same picture; another seed other masks
    again = reconstruct(checkpoint, *files, "--input_size", "64", "--output", tmp_path / "again.png", "--seed", "4")
    assert again.returncode == 0 and np.array_equal(np.asarray(Image.open(tmp_path / "again.png")), grid)
    reconstruct(checkpoint, *files, "--input_size", "64", "--output", tmp_path / "other.png", "--seed", "5")
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "other.png")), grid)


def test_an_official_minkowski_checkpoint_reconstructs_like_our_model(tmp_path):
    torch.manual_seed(0)
    model = fcmae.create_model("convnextv2_atto", decoder_embed_dim=64).eval()
    path = tmp_path / "checkpoint-41.pth"
    torch.save(minkowski_checkpoint(model), path)
    make_images(tmp_path / "img", count=1, size=96, classes=("x",))
    picture = tmp_path / "img" / "x" / "img_000.png"
    result = reconstruct(path, picture, "--input_size", "96", "--output", tmp_path / "grid.png")
    assert result.returncode == 0, result.stderr
    # the same picture as the original model draws for the same masks
    from fcmae.data import derive_seed, normalization, view_transform
    from fcmae.models import random_patch_mask
    imgs = view_transform(96)(Image.open(picture).convert("RGB")).unsqueeze(0)
    masks = random_patch_mask(1, 9, 0.6, generator=torch.Generator().manual_seed(derive_seed(0, "pictures")))
    expected = reconstruction_grid(model, imgs, masks, *normalization(3))
    written = torch.from_numpy(np.array(Image.open(tmp_path / "grid.png"))).permute(2, 0, 1).float() / 255
    assert (written - expected).abs().max() <= 1 / 255 + 1e-6  # 8-bit rounding of the PNG


def test_an_encoder_without_its_decoder_is_one_sentence(pretrained):
    images, out = pretrained
    result = reconstruct(out / "encoder.safetensors", images / "a" / "img_000.png")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        f"python -m fcmae.reconstruct: error: {out / 'encoder.safetensors'} holds a convnextv2_atto encoder without "
        "the decoder, so it cannot reconstruct anything; pass a pretraining checkpoint "
        "(output_dir/checkpoints/checkpoint-<step>, or an official main_pretrain.py checkpoint)")


@pytest.mark.parametrize("args,message", [
    (["{image}"], "is not a readable image"),
    (["{picture}", "--model", "convnextv2_tiny"], "holds convnextv2_atto, not convnextv2_tiny"),
    (["{picture}", "--input_size", "100"], "--input_size must be a multiple of 32"),
    (["{picture}", "--mask_ratio", "1"], r"--mask_ratio must be in [0, 1), got 1"),
])
def test_bad_input_is_one_sentence(pretrained, args, message, tmp_path):
    images, out = pretrained
    (tmp_path / "notes.jpg").write_text("not an image")
    fill = {"{image}": tmp_path / "notes.jpg", "{picture}": images / "a" / "img_000.png"}
    checkpoint = sorted((out / "checkpoints").glob("checkpoint-*"))[-1]
    result = reconstruct(checkpoint, *[fill.get(a, a) for a in args], "--output", tmp_path / "g.png")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
