"""Weight formats: one object per ConvNeXt V2 checkpoint layout that this project reads or writes.

A format says
- how to recognise its state dicts: the stem conv's key and a block's depthwise-conv key;
- how its keys and tensors map to ours: `rows(arch)`, a list of (our key, their key, kind), one
  table for both directions (the kinds, how a tensor changes shape, are in fcmae.layouts);
- which of its tensors are a classifier head, left out of an encoder and offered to fine-tuning;
- how it is written, when it can be exported (`write`).

reading.py and writing.py go through FORMATS. Adding a format is a subclass here and its entry
in FORMATS.
"""
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from fcmae.models.convnextv2 import MODEL_SPECS
from fcmae.models.fcmae import create_model
from fcmae.weights.files import WeightsError, atomic_write, statistics_metadata


@dataclass
class Architecture:
    name: str
    in_chans: int
    decoder_depth: int | None = None      # None: the weights hold no decoder
    decoder_embed_dim: int | None = None

    @property
    def has_decoder(self):
        return self.decoder_depth is not None

    def create_model(self, **kwargs):
        extra = {}
        if self.has_decoder:
            extra = dict(decoder_depth=self.decoder_depth, decoder_embed_dim=self.decoder_embed_dim)
        return create_model(self.name, in_chans=self.in_chans, **extra, **kwargs)

    def encoder_only(self):
        return Architecture(self.name, self.in_chans)


def reference_shapes(arch):
    """Our state dict's shapes for `arch`, without allocating it."""
    with torch.device("meta"):
        model = arch.create_model()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return shapes if arch.has_decoder else {k: s for k, s in shapes.items() if k.startswith("encoder.")}


def with_bias(*pairs):
    """Rows for (our module, their module, the weight's kind): the weight, then the bias (same)."""
    rows = []
    for ours, theirs, kind in pairs:
        rows += [(f"{ours}.weight", f"{theirs}.weight", kind), (f"{ours}.bias", f"{theirs}.bias", "same")]
    return rows


class WeightFormat:
    """One checkpoint layout. A subclass sets the attributes below and gives `rows`, and `write`
    when it can be exported; the methods here read every format the same way."""
    name = ""
    stem_key = ""                 # the stem conv's weight, (width, in_chans, 4, 4) in every format
    block_pattern = ""            # a block's depthwise-conv key; groups: stage, block
    decoder_block_pattern = None  # a decoder block's depthwise-conv key, for formats that hold a decoder
    classifier_pattern = r"$^"    # tensors an encoder never has (a classifier head and its norm)
    head_keys = {}                # their classifier tensors, by timm's convnextv2 names
    exportable = False

    def recognises(self, state):
        return self.stem_key in state and any(re.fullmatch(self.block_pattern, k) for k in state)

    def architecture(self, state):
        """The model size, input channels and decoder (if any) of a state dict in this format."""
        dim0, in_chans = state[self.stem_key].shape[:2]
        depths = [0, 0, 0, 0]
        for key in state:
            if m := re.fullmatch(self.block_pattern, key):
                stage, block = int(m.group(1)), int(m.group(2))
                if stage < 4:
                    depths[stage] = max(depths[stage], block + 1)
        name = next((n for n, s in MODEL_SPECS.items() if s.depths == tuple(depths) and s.dims[0] == dim0), None)
        if name is None:
            raise WeightsError(f"the weights have depths {depths} and stem width {dim0}, which match no "
                               f"ConvNeXt V2 size ({', '.join(MODEL_SPECS)})")
        arch = Architecture(name, int(in_chans))
        if self.decoder_block_pattern and "proj.weight" in state:
            blocks = [int(m.group(1)) for k in state if (m := re.fullmatch(self.decoder_block_pattern, k))]
            arch.decoder_depth = max(blocks) + 1 if blocks else 0
            arch.decoder_embed_dim = int(state["proj.weight"].shape[0])
        return arch

    def rows(self, arch, shapes=None):
        """(our key, their key, kind) for every tensor of `arch`; our keys with 'encoder.'.
        `shapes` (reference_shapes(arch)) saves recomputing them where a format needs them."""
        raise NotImplementedError

    def head(self, state):
        """The classifier tensors of `state`, by timm's names."""
        return {timm_key: state[key] for key, timm_key in self.head_keys.items() if key in state}

    def write(self, tensors, arch, path, pth=False, statistics=None):
        """Write an encoder's `tensors` (this format's keys) to `path`, with the input's `statistics`
        ({"mean", "std"}) where the format has a place for them; returns what the report adds."""
        raise NotImplementedError


class Fcmae(WeightFormat):
    """This project's own state dicts: encoder.* in timm's names, and the decoder."""
    name = "fcmae"
    stem_key = "encoder.stem.0.weight"
    block_pattern = r"encoder\.stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.weight"
    decoder_block_pattern = r"decoder\.(\d+)\.conv_dw\.weight"

    def rows(self, arch, shapes=None):
        return [(k, k, "same") for k in (shapes if shapes is not None else reference_shapes(arch))]


class Timm(WeightFormat):
    """timm's convnextv2: our encoder keys without the prefix (and a head)."""
    name = "timm"
    stem_key = "stem.0.weight"
    block_pattern = r"stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.weight"
    classifier_pattern = r"head\..*"
    exportable = True

    def rows(self, arch, shapes=None):
        shapes = shapes if shapes is not None else reference_shapes(arch)
        return [(k, k.removeprefix("encoder."), "same") for k in shapes if k.startswith("encoder.")]

    def head(self, state):  # any head of timm's model, a linear probe's included
        return {k: v for k, v in state.items() if k.startswith("head.")}

    def write(self, tensors, arch, path, pth=False, statistics=None):
        if pth or path.suffix in (".pth", ".pt"):
            atomic_write(path, lambda tmp: torch.save(tensors, tmp))
        else:
            metadata = {"model": arch.name, "layout": "timm", "in_chans": str(arch.in_chans),
                        **statistics_metadata(statistics)}
            atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
        return {}


class Renamed(WeightFormat):
    """A format whose encoder keys are renamed from ours, stage by stage and block by block."""
    prefix = ""                      # before each of their encoder keys
    stem_names = ("", "")            # their stem conv and LayerNorm
    downsample_name = ""             # their downsampling layer before stage > 0: LayerNorm .0, conv .1
    block_name = ""                  # their block, from {stage} and {block}
    block = ()                       # one block's rows: (our name, their name, kind), within the block

    def downsample(self, stage):
        """Rows of the downsampling layer before `stage`, our names without 'encoder.'."""
        theirs = self.downsample_name.format(stage=stage)
        return with_bias((f"stages.{stage}.downsample.1", f"{theirs}.1", "same"),
                         (f"stages.{stage}.downsample.0", f"{theirs}.0", "same"))

    def rows(self, arch, shapes=None):
        rows = with_bias(("stem.0", self.stem_names[0], "same"), ("stem.1", self.stem_names[1], "same"))
        for i, depth in enumerate(MODEL_SPECS[arch.name].depths):
            if i > 0:
                rows += self.downsample(i)
            for j in range(depth):
                theirs = self.block_name.format(stage=i, block=j)
                rows += [(f"stages.{i}.blocks.{j}.{a}", f"{theirs}.{b}", kind) for a, b, kind in self.block]
        rows = [(f"encoder.{ours}", f"{self.prefix}{theirs}", kind) for ours, theirs, kind in rows]
        if arch.has_decoder:
            rows += decoder_rows(arch.decoder_depth)
        return rows


# one block of the official dense model (and of both official decoders)
OFFICIAL_BLOCK = (*with_bias(("conv_dw", "dwconv", "same"), ("norm", "norm", "same"), ("mlp.fc1", "pwconv1", "linear"),
                             ("mlp.fc2", "pwconv2", "linear")),
                  ("mlp.grn.weight", "grn.gamma", "vector"), ("mlp.grn.bias", "grn.beta", "vector"))


def decoder_rows(decoder_depth):
    """The decoder's rows, the same in the official dense and MinkowskiEngine checkpoints."""
    rows = [(k, k, "same") for k in ("proj.weight", "proj.bias", "mask_token", "pred.weight", "pred.bias")]
    for j in range(decoder_depth):
        rows += [(f"decoder.{j}.{a}", f"decoder.{j}.{b}", kind) for a, b, kind in OFFICIAL_BLOCK]
    return rows


class Official(Renamed):
    """The official dense ConvNeXt V2 (released *_fcmae.pt files, fine-tuned models): {"model": ...}."""
    name = "official"
    stem_key = "downsample_layers.0.0.weight"
    block_pattern = r"stages\.(\d+)\.(\d+)\.dwconv\.weight"
    classifier_pattern = r"(head|norm)\..*"
    head_keys = {"norm.weight": "head.norm.weight", "norm.bias": "head.norm.bias",
                 "head.weight": "head.fc.weight", "head.bias": "head.fc.bias"}
    stem_names = ("downsample_layers.0.0", "downsample_layers.0.1")
    downsample_name = "downsample_layers.{stage}"
    block_name = "stages.{stage}.{block}"
    block = OFFICIAL_BLOCK
    exportable = True

    def write(self, tensors, arch, path, pth=False, statistics=None):
        atomic_write(path, lambda tmp: torch.save({"model": tensors}, tmp))
        return {}


class Minkowski(Official):
    """The official FCMAE training checkpoints (main_pretrain.py): a MinkowskiEngine encoder under
    'encoder.', kernels as (k*k, C_in, C_out), and the dense decoder."""
    name = "minkowski"
    stem_key = "encoder.downsample_layers.0.0.weight"
    block_pattern = r"encoder\.stages\.(\d+)\.(\d+)\.dwconv\.kernel"
    decoder_block_pattern = r"decoder\.(\d+)\.dwconv\.weight"
    classifier_pattern = r"$^"
    head_keys = {}
    prefix = "encoder."
    block = (*with_bias(("norm", "norm.ln", "same"), ("mlp.fc1", "pwconv1.linear", "linear"),
                        ("mlp.fc2", "pwconv2.linear", "linear")),
             ("mlp.grn.weight", "grn.gamma", "row"), ("mlp.grn.bias", "grn.beta", "row"),
             ("conv_dw.weight", "dwconv.kernel", "me_dw"), ("conv_dw.bias", "dwconv.bias", "row"))
    exportable = False

    def downsample(self, stage):  # a sparse conv's kernel and bias; the LayerNorm wrapped as .ln
        return [(f"stages.{stage}.downsample.1.weight", f"downsample_layers.{stage}.1.kernel", "me_conv"),
                (f"stages.{stage}.downsample.1.bias", f"downsample_layers.{stage}.1.bias", "row"),
                *with_bias((f"stages.{stage}.downsample.0", f"downsample_layers.{stage}.0.ln", "same"))]


class HuggingFace(Renamed):
    """transformers' ConvNextV2Model / ConvNextV2ForImageClassification: a folder with config.json."""
    name = "hf"
    stem_key = "embeddings.patch_embeddings.weight"
    block_pattern = r"encoder\.stages\.(\d+)\.layers\.(\d+)\.dwconv\.weight"
    classifier_pattern = r"(layernorm|pooler|classifier)\..*"
    head_keys = {"layernorm.weight": "head.norm.weight", "layernorm.bias": "head.norm.bias",
                 "classifier.weight": "head.fc.weight", "classifier.bias": "head.fc.bias"}
    block = (*with_bias(("conv_dw", "dwconv", "same"), ("norm", "layernorm", "same"),
                        ("mlp.fc1", "pwconv1", "linear"), ("mlp.fc2", "pwconv2", "linear")),
             ("mlp.grn.weight", "grn.weight", "vector"), ("mlp.grn.bias", "grn.bias", "vector"))
    stem_names = ("embeddings.patch_embeddings", "embeddings.layernorm")
    downsample_name = "encoder.stages.{stage}.downsampling_layer"
    block_name = "encoder.stages.{stage}.layers.{block}"
    exportable = True

    def write(self, tensors, arch, path, pth=False, statistics=None):
        # ConvNextV2Model ends in a LayerNorm (for pooling) that FCMAE never trains: written as
        # the identity, and reported
        spec = MODEL_SPECS[arch.name]
        width = spec.dims[-1]
        tensors = {**tensors, "layernorm.weight": torch.ones(width), "layernorm.bias": torch.zeros(width)}
        path.mkdir(parents=True, exist_ok=True)
        config = {
            "model_type": "convnextv2", "architectures": ["ConvNextV2Model"], "num_channels": arch.in_chans,
            "patch_size": 4, "num_stages": 4, "hidden_sizes": list(spec.dims), "depths": list(spec.depths),
            "hidden_act": "gelu", "layer_norm_eps": 1e-6, "drop_path_rate": 0.0, "image_size": 224,
            "initializer_range": 0.02,
        }
        if statistics:  # where Hugging Face's image processors keep them
            config.update(image_mean=list(statistics["mean"]), image_std=list(statistics["std"]))
            if statistics.get("channel_names") is not None:
                config["channel_names"] = list(statistics["channel_names"])
        atomic_write(path / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))
        atomic_write(path / "model.safetensors", lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
        return {"added": ["layernorm.weight (ones)", "layernorm.bias (zeros)"]}


class HuggingFaceClassifier(HuggingFace):
    """transformers' ConvNextV2ForImageClassification as saved (the models on the Hub): the
    encoder under 'convnextv2.', the head's LayerNorm as convnextv2.layernorm, then classifier."""
    name = "hf_classifier"
    stem_key = "convnextv2.embeddings.patch_embeddings.weight"
    block_pattern = r"convnextv2\.encoder\.stages\.(\d+)\.layers\.(\d+)\.dwconv\.weight"
    classifier_pattern = r"(convnextv2\.layernorm|classifier)\..*"
    head_keys = {"convnextv2.layernorm.weight": "head.norm.weight", "convnextv2.layernorm.bias": "head.norm.bias",
                 "classifier.weight": "head.fc.weight", "classifier.bias": "head.fc.bias"}
    prefix = "convnextv2."
    exportable = False


FORMATS = (Fcmae(), Timm(), Official(), Minkowski(), HuggingFace(), HuggingFaceClassifier())
EXPORT_FORMATS = tuple(f.name for f in FORMATS if f.exportable)


def weight_format(name):
    found = next((f for f in FORMATS if f.name == name), None)
    if found is None:
        raise WeightsError(f"unknown weight format {name!r}; known: {', '.join(f.name for f in FORMATS)}")
    return found


def export_format(name):
    found = next((f for f in FORMATS if f.name == name and f.exportable), None)
    if found is None:
        choices = ", ".join(f.name for f in FORMATS if f.exportable)
        raise WeightsError(f"unknown export format {name!r}; choose one of: {choices}")
    return found


def detect_format(state):
    """The format of a state dict, recognised by its keys."""
    found = next((f for f in FORMATS if f.recognises(state)), None)
    if found is None:
        sample = ", ".join(sorted(state)[:5])
        raise WeightsError(f"these weights are in no ConvNeXt V2 layout this project knows (first keys: {sample}); "
                           f"known layouts: {', '.join(f.name for f in FORMATS)}")
    return found
