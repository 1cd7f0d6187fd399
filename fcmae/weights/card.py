"""The model card (README.md) of a Hugging Face export, ready for the Hub: its YAML metadata block
(licence, library, tags, pipeline and, when the run evaluated the weights, a model-index), then
what the weights are, how they were trained and evaluated, their licence, and how to load and
upload them.

What the card says of training comes from the checkpoint's own record, where it has one: the
run's args.json (data, recipe), the checkpoint's state.json (steps, epoch) and the run's
metrics.json (its latest evaluation, and fine-tuning's best). A record is found for a
checkpoint folder RUN/checkpoints/checkpoint-N, a file inside one, or a file in the run's folder
RUN (encoder.safetensors, model_best.safetensors); elsewhere the card says "not recorded".

The official ConvNeXt V2 weights are released under CC-BY-NC 4.0: weights in their layouts (the
official dense one, MinkowskiEngine's, a Hub classifier), or whose run started from such a file
(--init, --resume, --finetune: the file's layout when it still exists, its name, matched against
the official releases' names, when not; and that file's own run, in turn), get a warning in the
card and in the report.
"""
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fcmae.models.convnextv2 import MODEL_SPECS
from fcmae.weights.files import WeightsError, atomic_write, read_state_dict
from fcmae.weights.formats import detect_format

CARD = "README.md"
NOT_RECORDED = "not recorded"
OFFICIAL_LAYOUTS = {"official": "the official dense layout", "minkowski": "the official MinkowskiEngine layout",
                    "hf_classifier": "the layout of the Hub's facebook/convnextv2-* classifiers"}
_SIZES = "|".join(name.removeprefix("convnextv2_") for name in MODEL_SPECS)
# the names the official weights are released and served under: convnextv2_base_1k_224_fcmae.pt,
# convnextv2_tiny_22k_384_ema.pt, timm's convnextv2_atto.fcmae (saved as convnextv2_atto_fcmae.*),
# the Hub's facebook/convnextv2-tiny-1k-224
OFFICIAL_NAMES = re.compile(rf"convnextv2_({_SIZES})(_(1k|22k)_\d+)?[_.](fcmae|ema)\b|"
                            rf"convnextv2[_-]({_SIZES})[_-](1k|22k)[_-]\d+|facebook/convnextv2", re.I)
STARTING_FLAGS = ("init", "finetune", "resume")  # the training flags that name the weights a run started from
LICENCE_ID = re.compile(r"[a-z0-9][a-z0-9.+-]*")
ANCESTRY_DEPTH = 4  # runs followed back through their starting weights


def licence_id(value):
    """The Hub's form of a licence id (lower case, SPDX-like: apache-2.0, cc-by-nc-4.0, other), or
    WeightsError."""
    lowered = str(value).strip().lower()
    if not LICENCE_ID.fullmatch(lowered):
        raise WeightsError(f"--license {value!r} is not a licence id; give an SPDX-like id such as apache-2.0, "
                           "mit or cc-by-nc-4.0 (or other)")
    return lowered


# ----- the checkpoint's own record --------------------------------------------------------------------

@dataclass
class RunRecord:
    """What a training run kept beside the weights; every part None where it is missing."""
    folder: Path | None = None       # the run's output_dir
    args: dict | None = None         # its args.json
    state: dict | None = None        # the checkpoint's state.json (train_state, run shape)
    state_from: Path | None = None   # the checkpoint folder that state.json is in
    metrics: dict | None = None      # its metrics.json: the latest evaluation
    problems: list = field(default_factory=list)  # record files that could not be read

    @property
    def kind(self):
        """"pretraining", "fine-tuning", "linear probe", or None without args.json."""
        if not self.args:
            return None
        if "mask_ratio" in self.args:
            return "pretraining"
        return "linear probe" if self.args.get("linear_probe") in (True, "True", "true") else "fine-tuning"


def _json(path, record):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        record.problems.append(f"{path.name} ({type(err).__name__})")
        return None


def run_record(source):
    """The RunRecord of the weights at `source` (empty for a state dict or weights outside a run)."""
    record = RunRecord()
    if isinstance(source, dict) or not source:
        return record
    path = Path(source)
    folder = path if path.is_dir() else path.parent
    checkpoint = folder if (folder / "state.json").is_file() else None
    run = checkpoint.parent.parent if checkpoint is not None else folder
    if not (run / "args.json").is_file():
        return record if checkpoint is None else _with_state(record, checkpoint)
    record.folder = run
    record.args = _json(run / "args.json", record)
    if (run / "metrics.json").is_file():
        record.metrics = _json(run / "metrics.json", record)
    if checkpoint is None:  # a file of the run's folder: the run's newest checkpoint says how far it went
        from fcmae.training.checkpoint import latest_checkpoint

        checkpoint = latest_checkpoint(run / "checkpoints")
    return record if checkpoint is None else _with_state(record, checkpoint)


def _with_state(record, checkpoint):
    state = _json(checkpoint / "state.json", record) if (checkpoint / "state.json").is_file() else None
    if isinstance(state, dict):
        record.state, record.state_from = state, checkpoint
    return record


# ----- where the weights come from: the CC-BY-NC question ---------------------------------------------

def layout_of(path):
    """The weight format of the file or folder at `path`, or None when it cannot be read."""
    try:
        return detect_format(read_state_dict(path)[0]).name
    except (WeightsError, OSError, RuntimeError, ValueError):
        return None


def official_descent(source, source_format=None, depth=0, seen=None):
    """Why the weights at `source` may descend from the official CC-BY-NC 4.0 checkpoints (a
    phrase), or None. `source_format`: their format's name, when already known."""
    seen = set() if seen is None else seen
    if isinstance(source, dict) or not source or depth > ANCESTRY_DEPTH or str(source) in seen:
        return None
    seen.add(str(source))
    if source_format in OFFICIAL_LAYOUTS:
        return f"they are in {OFFICIAL_LAYOUTS[source_format]}"
    name = Path(str(source)).name  # the file's or folder's own name: a run folder may be named anything
    if not Path(str(source)).exists() and OFFICIAL_NAMES.search(name):  # gone: its name is all there is
        return f"{name} is named as the official releases are"
    args = run_record(source).args or {}
    for flag in STARTING_FLAGS:
        start = args.get(flag)
        if not start or not isinstance(start, str):
            continue
        exists = Path(start).exists()
        why = official_descent(start, layout_of(start) if exists else None, depth + 1, seen)
        if why:
            return f"their run started from --{flag} {start}, and {why}"
    return None


def licence_warning(why):
    return (f"these weights may descend from the official ConvNeXt V2 checkpoints, which are released under "
            f"CC-BY-NC 4.0 (non-commercial use only): {why}; check their terms before choosing a licence or "
            f"using them commercially")


# ----- the card's parts -------------------------------------------------------------------------------

def _number(value):
    return f"{value:g}" if isinstance(value, float) else str(value)


def _values(values):
    return ", ".join(_number(v) for v in values)


def effective_batch(record):
    """(effective batch or None, how it is made up)."""
    run_shape = (record.state or {}).get("run") or {}
    args = record.args or {}
    batch = run_shape.get("eff_batch")
    parts = [run_shape.get("batch_size", args.get("batch_size")), run_shape.get("update_freq", args.get("update_freq"))]
    processes = run_shape.get("processes")
    how = f"{parts[0]} per process x {parts[1]} accumulation" + (f" x {processes} processes" if processes else "")
    return batch, how


def recipe_lines(record):
    """The training part of the card, as bullet lines."""
    args, kind = record.args, record.kind
    if not args:
        return [f"- Data, recipe and steps: {NOT_RECORDED} (the weights come without their run's args.json)."]
    lines = [f"- Training: {'FCMAE ' if kind == 'pretraining' else ''}{kind} with fcmae, run folder "
             f"`{record.folder.name}`."]
    data = args.get("data_path")
    lines.append(f"- Data: `{data}`" + (f" ({args['data_set']})" if args.get("data_set") else "") + "."
                 if data else "- Data: the photographs bundled with scikit-image (the demo run).")
    batch, how = effective_batch(record)
    lr = args.get("lr")
    if lr is None and batch and args.get("blr") is not None:
        lr = args["blr"] * batch / 256
    recipe = [f"{args['epochs']} epochs" if "epochs" in args else None,
              f"effective batch {batch} ({how})" if batch else f"batch {how}",
              f"blr {_number(args['blr'])}" if args.get("blr") is not None else None,
              f"lr {lr:.3g}" if lr is not None else None,
              f"warm-up {args['warmup_epochs']} epochs" if args.get("warmup_epochs") else None,
              f"weight decay {_number(args['weight_decay'])}" if "weight_decay" in args else None,
              f"mask ratio {_number(args['mask_ratio'])}" if "mask_ratio" in args else None,
              f"input size {args['input_size']} px" if "input_size" in args else None,
              f"max steps {args['max_steps']}" if args.get("max_steps") else None]
    lines.append("- Recipe: " + ", ".join(r for r in recipe if r) + ".")
    for flag in STARTING_FLAGS:
        if args.get(flag):
            lines.append(f"- Started from: `--{flag} {args[flag]}`.")
    lines.append(f"- Steps: {progress(record)}.")
    return lines


def progress(record):
    train = (record.state or {}).get("train_state")
    if not isinstance(train, dict):
        return NOT_RECORDED
    where = record.state_from.name
    return (f"global step {train.get('global_step')}, epoch {train.get('epoch')} in progress with "
            f"{train.get('step_in_epoch')} of its steps done (state.json of {where})")


# metrics.json's entries the card reports: (name, a percentage)
REPORTED = {"test_acc1": ("top-1 accuracy", True), "test_acc5": ("top-5 accuracy", True),
            "test_acc1_ema": ("top-1 accuracy of the EMA weights", True), "test_loss": ("loss", False),
            "acc1": ("top-1 accuracy", True), "acc5": ("top-5 accuracy", True), "loss": ("loss", False),
            "held_out_loss": ("held-out reconstruction loss", False),
            "knn_top1": ("k-NN top-1 accuracy", True), "knn_top5": ("k-NN top-5 accuracy", True)}


def evaluation(record):
    """(result lines, [(name, value, is_knn)] for the model-index) from the run's metrics.json:
    its latest evaluation, and fine-tuning's best top-1."""
    metrics = record.metrics
    if not isinstance(metrics, dict):
        why = " (the run has no metrics.json)" if record.args else ""
        return [f"Evaluation: {NOT_RECORDED}{why}."], []
    at = ", ".join(f"{k} {metrics[k]}" for k in ("epoch", "step") if k in metrics)
    data = metrics.get("data") or metrics.get("weights")
    lines = [f"The run's latest evaluation (metrics.json{', ' + at if at else ''}"
             f"{f', on `{data}`' if data else ''}), which may be later than these weights:", ""]
    index = []
    for key, (name, percent) in REPORTED.items():
        value = metrics.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        lines.append(f"- {name}: {value:.2f}%" if percent else f"- {name}: {value:.4f}")
        if percent and key != "test_acc1_ema":
            index.append((name, value, key.startswith("knn")))
    best = metrics.get("best")
    if isinstance(best, dict) and isinstance(best.get("acc1"), (int, float)):
        lines.append(f"- best top-1 accuracy of the run: {best['acc1']:.2f}% at epoch {best.get('epoch')}")
    return lines, index


def model_index(name, record, results):
    """The Hub's model-index for the accuracies in `results` [(name, value, is_knn)]."""
    if not results:
        return None
    args = record.args or {}
    metrics = record.metrics or {}
    entries = []
    for knn in (False, True):
        chosen = [(n, v) for n, v, k in results if k == knn]
        if not chosen:
            continue
        data = str(args.get("knn_eval_path") if knn else metrics.get("data") or args.get("eval_data_path")
                   or args.get("data_path") or NOT_RECORDED)
        entries.append({
            "task": {"type": "image-classification",
                     "name": "k-NN classification of the frozen features" if knn else "image classification"},
            "dataset": {"name": data, "type": data.removeprefix("hf:") if data.startswith("hf:") else "imagefolder"},
            "metrics": [{"type": "accuracy", "name": n, "value": round(float(v), 4)} for n, v in chosen]})
    return [{"name": name, "results": entries}]


def statistics_lines(statistics, record):
    """The normalisation: the statistics kept with the weights (config.json has them), else those
    the run's args.json records, else none."""
    args = record.args or {}
    names = (statistics or {}).get("channel_names") or args.get("channel_names")
    if statistics:
        where = f"kept with the weights ({statistics['source']})" if statistics.get("source") else "given to the export"
        text = f"{where}; config.json has them as image_mean and image_std"
        mean, std = statistics["mean"], statistics["std"]
    elif args.get("mean") and args.get("std"):
        text = "as the run's args.json records them; config.json has none, so give them to the image processor"
        mean, std = args["mean"], args["std"]
    else:
        return [f"- Normalisation: {NOT_RECORDED}; config.json has none (ImageNet's mean 0.485, 0.456, 0.406 and "
                "std 0.229, 0.224, 0.225 are the usual default for RGB).", "- Channel names: not recorded."]
    return [f"- Normalisation: mean ({_values(mean)}), std ({_values(std)}) on pixels scaled to [0, 1], {text}.",
            f"- Channels: {', '.join(names)}." if names else "- Channel names: not recorded."]


# ----- the card -----------------------------------------------------------------------------------

TAGS = ["convnextv2", "fcmae", "image-feature-extraction", "vision"]


def front_matter(name, licence, record, index):
    """The Hub's YAML metadata block, `---` to `---`."""
    meta = {"license": licence, "library_name": "transformers", "tags": TAGS,
            "pipeline_tag": "image-feature-extraction"}
    found = model_index(name, record, index)
    if found:
        meta["model-index"] = found
    return ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(), "---"]


def model_lines(arch, parameters, statistics, record):
    spec = MODEL_SPECS[arch.name]
    size = (record.args or {}).get("input_size")
    trained_at = f"trained at {size} px" if size else f"input size {NOT_RECORDED}"
    return [f"- Architecture: `{arch.name}`, depths {_values(spec.depths)}, widths {_values(spec.dims)}; "
            f"{parameters / 1e6:.2f}M parameters in the encoder.",
            f"- Input: {arch.in_chans} channels; {trained_at} (any size divisible by 32 runs).",
            *statistics_lines(statistics, record),
            f"- Output: `last_hidden_state` (batch, {spec.dims[-1]}, H/32, W/32); its `pooler_output` is the mean "
            "over the positions through a final LayerNorm that FCMAE never trains, written as the identity."]


def licence_lines(licence, stated, warning):
    lines = [f"`{licence}`" + ("" if stated else ": the licence was not stated when these weights were exported "
                               "(give `--license ID`, or set `license:` above).")]
    return lines + (["", f"{warning[0].upper()}{warning[1:]}."] if warning else [])


def usage_lines(name, arch):
    return ["```python", "from transformers import ConvNextV2Model", "",
            f'model = ConvNextV2Model.from_pretrained("{name}")  # this folder, or its repository on the Hub',
            "features = model(pixel_values).pooler_output", "```", "",
            "For timm's `convnextv2` the same weights export with `python -m fcmae.export SOURCE --format timm "
            f"--output encoder.safetensors`, which loads with `timm.create_model(\"{arch.name}\", num_classes=0, "
            'pretrained=True, pretrained_cfg_overlay=dict(file="encoder.safetensors"))`.', "",
            "## Upload", "", "```python", "from huggingface_hub import upload_folder", "",
            f'upload_folder(folder_path="{name}", repo_id="USER/{name}")', "```"]


def model_card(folder, arch, parameters, source=None, source_format=None, statistics=None, license=None):
    """(the card's text, the CC-BY-NC warning or None) for the Hugging Face export in `folder` of
    `arch` (`parameters`: the encoder's count) from `source`."""
    name = Path(folder).name
    licence = licence_id(license) if license else "other"
    record = run_record(source)
    why = official_descent(source, source_format)
    warning = licence_warning(why) if why else None
    results, index = evaluation(record)
    origin = source if source is not None and not isinstance(source, dict) else "a model"
    lines = [*front_matter(name, licence, record, index), "", f"# {name}", "",
             f"A ConvNeXt V2 {arch.name.removeprefix('convnextv2_')} encoder for transformers' `ConvNextV2Model`, "
             f"exported by fcmae from `{origin}`.", ""]
    if warning:
        lines += [f"> **Licence warning:** {warning}.", ""]
    lines += ["## Model", "", *model_lines(arch, parameters, statistics, record), "",
              "## Training", "", *recipe_lines(record), "", "## Evaluation", "", *results, "",
              "## Licence", "", *licence_lines(licence, bool(license), warning), "",
              "## How to use", "", *usage_lines(name, arch), ""]
    if record.problems:
        lines += [f"(Parts of the run's record could not be read: {', '.join(record.problems)}.)", ""]
    return "\n".join(lines), warning


def write_card(folder, arch, parameters, source=None, source_format=None, statistics=None, license=None):
    """Write the model card into `folder` (README.md); returns what the export's report adds:
    "card" (its path) and "warning" (the CC-BY-NC sentence, or None)."""
    text, warning = model_card(folder, arch, parameters, source, source_format, statistics, license)
    path = Path(folder) / CARD
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return {"card": path, "warning": warning}
