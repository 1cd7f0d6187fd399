"""How far scaled JPEG decoding (--decoder scaled) lands from full decoding (--decoder full).

    python benchmarks/loader/deviation.py                       # scikit-image's photographs
    python benchmarks/loader/deviation.py --photos DIR ... --json out.json

For every photograph and `--crops` seeds, the pretraining augmentation draws a crop (as in
training: RandomResizedCrop scale 0.2-1, flip) and both decoders produce it at `--input_size`;
the table gives, per DCT reduction the scaled decoder used (1 = it decoded every pixel, so the
result is bitwise the full decoder's), the mean absolute difference in 0-255 levels and the
PSNR (over all pixels of all crops at that reduction), and the worst crop's PSNR. JPEG files are
used as they are; other formats are first saved as JPEG at quality 95 (in memory) so that the
scaled decoder has something to scale.
"""
import argparse
import io
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from fcmae.data import FullDecoder, PretrainTransform, ScaledDecoder, derive_seed, find_images, seeded  # noqa: E402
from fcmae.data.folders import sample_photographs  # noqa: E402


def jpeg_bytes(path):
    data = Path(path).read_bytes()
    with Image.open(io.BytesIO(data)) as img:
        if img.format == "JPEG":
            return data
        out = io.BytesIO()
        img.convert("RGB").save(out, "JPEG", quality=95)
        return out.getvalue()


def compare(data, transform, seed):
    """(reduction used, |scaled - full| as float array) for one crop of one image."""
    with seeded(seed), Image.open(io.BytesIO(data)) as img:
        crop = transform.plan(img)
    top, left, height, width = crop.box
    with Image.open(io.BytesIO(data)) as img:
        reduction = ScaledDecoder().reduce(img, min(width / crop.size[1], height / crop.size[0]))
    with Image.open(io.BytesIO(data)) as img:
        full = np.asarray(FullDecoder().crop_pil(img, crop, "RGB"), dtype=np.float64)
    with Image.open(io.BytesIO(data)) as img:
        scaled = np.asarray(ScaledDecoder().crop_pil(img, crop, "RGB"), dtype=np.float64)
    return reduction, scaled - full


def psnr(mse):
    return math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse)


def measure(files, input_size, crops):
    transform = PretrainTransform(input_size)
    sums = defaultdict(lambda: {"crops": 0, "abs": 0.0, "sq": 0.0, "pixels": 0, "worst_psnr": math.inf})
    for index, path in enumerate(files):
        data = jpeg_bytes(path)
        for k in range(crops):
            reduction, diff = compare(data, transform, derive_seed(0, "sample", k, index))
            s = sums[reduction]
            s["crops"] += 1
            s["abs"] += np.abs(diff).sum()
            s["sq"] += (diff ** 2).sum()
            s["pixels"] += diff.size
            s["worst_psnr"] = min(s["worst_psnr"], psnr((diff ** 2).mean()))
    return {r: {"crops": s["crops"], "mae": s["abs"] / s["pixels"], "psnr": psnr(s["sq"] / s["pixels"]),
                "worst_psnr": s["worst_psnr"]} for r, s in sorted(sums.items())}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--photos", nargs="*", default=None, help="folders of photographs (default: scikit-image's)")
    p.add_argument("--input_size", type=int, default=224)
    p.add_argument("--crops", type=int, default=20, help="crops per photograph")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    files = sample_photographs() if not args.photos else [f for d in args.photos for f in find_images(d)]
    results = measure(files, args.input_size, args.crops)
    print(f"{len(files)} photographs, {args.crops} crops each, {args.input_size} px")
    print(f"{'reduction':>10}{'crops':>8}{'MAE (levels)':>14}{'PSNR (dB)':>11}{'worst crop':>12}")
    for r, s in results.items():
        print(f"{'1/' + str(r):>10}{s['crops']:>8}{s['mae']:>14.3f}{s['psnr']:>11.1f}{s['worst_psnr']:>12.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"files": len(files), "input_size": args.input_size,
                                               "crops": args.crops, "by_reduction": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
