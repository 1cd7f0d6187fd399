"""The command lines of pretrain.py and finetune.py: help, ranges, the linear-probe settings."""
import importlib.util
import re
from pathlib import Path

import pytest

from fcmae.config import parse_with_config

ROOT = Path(__file__).resolve().parents[1]


def script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pretrain, finetune = script("pretrain"), script("finetune")


@pytest.mark.parametrize("module", [pretrain, finetune], ids=["pretrain", "finetune"])
def test_help_groups_every_option_with_a_line_and_its_default(module):
    parser = module.get_args_parser()
    text = parser.format_help()
    for group in ("model:", "optimisation:", "data:", "checkpoints and logs:", "devices and precision:"):
        assert f"\n{group}\n" in text, group
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{action.option_strings[0]} has no help"
    assert re.search(r"--epochs EPOCHS\s+length of the schedule \(default: (800|100)\)", text)
    assert "(default: 0.05)" in text  # weight decay


def test_pretrain_help_says_what_a_run_without_data_does():
    text = " ".join(pretrain.get_args_parser().format_help().split())
    assert "Without it, a demo runs on the photographs bundled with scikit-image" in text
    assert "model convnextv2_atto, input_size 128" in text and "(default: convnextv2_base)" in text


def test_finetune_help_says_data_path_is_required():
    text = finetune.get_args_parser().format_help()
    assert text.startswith("usage: python finetune.py --data_path PATH [options]")
    assert "--data_path DATA_PATH\n                        required:" in text


@pytest.mark.parametrize("module,args,message", [
    (pretrain, ["--lr", "-1"], "--lr must be 0 or more, got -1"),
    (pretrain, ["--blr", "-0.5"], "--blr must be 0 or more, got -0.5"),
    (pretrain, ["--clip_grad", "0"], "--clip_grad must be above 0, got 0"),
    (pretrain, ["--weight_decay", "-0.1"], "--weight_decay must be 0 or more, got -0.1"),
    (pretrain, ["--epochs", "2.5"], "--epochs expected a whole number, got '2.5'"),
    (pretrain, ["--seed", "-3"], "--seed must be 0 or more, got -3"),
    (pretrain, ["--input_size", "16"], "--input_size must be at least 32, got 16"),
    (pretrain, ["--input_size", "32"], r"--input_size 32 and --mask_ratio 0.6 leave no patch visible \(int\(1 x 0.4\) "
                                       r"= 0 of 1\); use a larger --input_size or a lower --mask_ratio"),
    (pretrain, ["--input_size", "64", "--mask_ratio", "0.8"], "leave no patch visible"),
    (pretrain, ["--backend", "minkowski", "--compile", "true"],
     "--backend minkowski cannot be compiled .*; use --backend sparse with --compile, or leave --compile off"),
    (finetune, ["--smoothing", "1.5"], r"--smoothing must be in \[0, 1\), got 1.5"),
    (finetune, ["--drop_path", "2"], r"--drop_path must be in \[0, 1\), got 2"),
    (finetune, ["--reprob", "1.2"], r"--reprob must be in \[0, 1\], got 1.2"),
    (finetune, ["--layer_decay", "0"], r"--layer_decay must be in \(0, 1\], got 0"),
    (finetune, ["--mixup_prob", "-1"], r"--mixup_prob must be in \[0, 1\], got -1"),
    (finetune, ["--opt_betas", "0.9", "1.5"], r"--opt_betas must be in \[0, 1\), got 1.5"),
    (finetune, ["--nb_classes", "0"], "--nb_classes must be at least 1, got 0"),
])
def test_out_of_range_values_stop_with_one_sentence(module, args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--data_path", str(tmp_path), "--output_dir", str(tmp_path / "out"), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert re.search(message, err), err


def test_out_of_range_values_in_a_config_file_stop_too(capsys, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("smoothing: 1.5\n")
    with pytest.raises(SystemExit):
        finetune.main(["--config", str(config), "--data_path", str(tmp_path)])
    assert re.search(r"config file .*c.yaml: smoothing: must be in \[0, 1\), got 1.5", capsys.readouterr().err)


def test_linear_probe_settings_beat_a_config_file_and_lose_to_the_command_line(tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text("smoothing: 0.2\ndrop_path: 0.1\nreprob: 0.25\nlayer_decay: 0.9\n")
    parser = finetune.get_args_parser()
    args = parse_with_config(parser, ["--config", str(config), "--linear_probe", "true", "--smoothing", "0.3"],
                             overrides=finetune.probe_defaults)
    assert args.smoothing == 0.3  # typed on the command line: it wins
    assert (args.drop_path, args.reprob, args.layer_decay, args.aa, args.mixup) == (0.0, 0.0, 1.0, "none", 0.0)
    assert finetune.probe_note(args).endswith("except what the command line set: --smoothing 0.3")
    # without --linear_probe the config file's recipe stands
    args = parse_with_config(finetune.get_args_parser(), ["--config", str(config)], overrides=finetune.probe_defaults)
    assert (args.smoothing, args.drop_path, args.layer_decay) == (0.2, 0.1, 0.9)
    # and --linear_probe in the config file turns the probe settings on as well
    config.write_text("linear_probe: true\nsmoothing: 0.2\n")
    args = parse_with_config(finetune.get_args_parser(), ["--config", str(config)], overrides=finetune.probe_defaults)
    assert (args.linear_probe, args.smoothing) == (True, 0.0)
