"""Command-line and YAML configuration shared by the training scripts.

Flags keep the official ConvNeXt V2 script names (`--batch_size`, `--blr`, ...). A YAML file
given with `--config` holds the same names as keys; flags on the command line override it.
Every bad value stops the script with one sentence naming the problem, never a traceback.
"""
import argparse
import contextlib
import re
import sys
from pathlib import Path

import yaml


@contextlib.contextmanager
def usage_errors(parser):
    """Inside the block, a ConfigError stops the command as a usage error: its one sentence after
    the command's name, exit code 2."""
    try:
        yield
    except ConfigError as err:
        parser.error(str(err))


class ConfigError(Exception):
    """A bad setting: the message is one sentence a user can act on."""


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help line ends with its default (when it has one)."""

    def _get_help_string(self, action):
        text = action.help or ""
        shown = action.default not in (None, argparse.SUPPRESS, "") and action.nargs != 0  # not for plain switches
        if shown and action.option_strings and "(default" not in text:
            text += " (default: %(default)s)"
        return text


class ArgumentParser(argparse.ArgumentParser):
    """argparse that prints only `prog: error: message` (no usage dump) and exits 2, and whose
    help shows every option's default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        # "argument --lr: must be above 0, got -1" reads better as "--lr must be above 0, got -1"
        message = re.sub(r"^argument (--\w+): (must be|expected) ", r"\1 \2 ", message)
        self.exit(2, f"{self.prog}: error: {message}\n")


def command_name(short):
    """How the user started command `short`: `fcmae-<short>` (the console script) or
    `python -m fcmae.<short>`, for its usage and error lines."""
    invoked = Path(sys.argv[0]).name
    return invoked if invoked == f"fcmae-{short}" else f"python -m fcmae.{short}"


def number(kind, low=None, high=None, low_open=False, high_open=False):
    """An argparse `type` for an int or float within bounds: the one place a flag's range is
    checked, for the command line and config files alike. A value out of range is one sentence:
    "argument --lr: must be above 0, got -1"."""
    if low is not None and high is not None:
        bounds = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        bounds = (f"above {low:g}" if low_open else
                  f"at least {low:g}" if low > 0 else f"{low:g} or more")
    else:
        bounds = f"below {high:g}" if high_open else f"at most {high:g}"

    def parse(value):
        try:
            if kind is int and (isinstance(value, float) and not value.is_integer() or isinstance(value, bool)):
                raise ValueError
            result = kind(value)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(
                f"expected {'a whole number' if kind is int else 'a number'}, got {value!r}") from None
        too_low = low is not None and (result <= low if low_open else result < low)
        too_high = high is not None and (result >= high if high_open else result > high)
        if too_low or too_high or result != result:  # NaN is never in range
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return result

    parse.__name__ = kind.__name__
    return parse


# the number types the commands share
POSITIVE_INT = number(int, 1)
COUNT = number(int, 0)
POSITIVE = number(float, 0, low_open=True)
NON_NEGATIVE = number(float, 0)
QUALITY = number(int, 1, 100)  # JPEG quality


def str2bool(value):
    if isinstance(value, bool):
        return value
    lowered = str(value).strip().lower()
    if lowered in ("1", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def float_list(text):
    """An argparse type for per-channel values (--mean, --std): '0.1,0.2,0.3' -> (0.1, 0.2, 0.3)."""
    try:
        return tuple(float(part) for part in str(text).split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def name_list(text):
    """An argparse type for --channel_names: 'B02,B03,B04' -> ('B02', 'B03', 'B04')."""
    names = tuple(part.strip() for part in str(text).split(","))
    if not all(names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of distinct names")
    return names


def channel_list(text):
    """An argparse type for --show_channels: '3,2,1' -> (3, 2, 1): three channels (red, green,
    blue) or one (grey), counted from 0."""
    try:
        channels = tuple(int(part) for part in str(text).split(","))
    except ValueError:
        channels = ()
    if len(channels) not in (1, 3) or min(channels) < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not three channel numbers (red, green, blue) or one")
    return channels


def load_yaml_config(path, parser):
    """The YAML file's settings as a dict of argument names, checked against the parser."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of argument names to values")
    known = {}
    for action in parser._actions:  # the first action of a dest carries its type (--x before --no_x)
        if action.dest != "help":
            known.setdefault(action.dest, action)
    checked = {}
    for key, value in values.items():
        action = known.get(str(key).replace("-", "_"))
        if action is None or action.dest == "config":
            raise ConfigError(f"config file {path} has an unknown key {key!r}; keys are the script's "
                              "argument names, such as batch_size or blr")
        # run values through the argument's own type, so YAML and flags agree
        if value is not None and action.type is not None and not isinstance(value, list):
            try:
                value = action.type(value)
            except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
                raise ConfigError(f"config file {path}: {action.dest}: {err}") from None
        if action.choices is not None and value not in action.choices:
            raise ConfigError(f"config file {path}: {action.dest} must be one of "
                              f"{', '.join(map(str, action.choices))}, got {value!r}")
        checked[action.dest] = value
    return checked


def parse_with_config(parser, argv=None, extra_defaults=None, overrides=None):
    """Parse `argv` with defaults from `--config FILE`, `extra_defaults(partial)` beneath it and
    `overrides(partial)` above it (each a function of the partly parsed arguments).

    Precedence: command line > overrides > config file > extra defaults > the parser's defaults.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    partial, _ = parser.parse_known_args(argv)
    file_values = {}
    if getattr(partial, "config", None):
        try:
            file_values = load_yaml_config(partial.config, parser)
        except ConfigError as err:
            parser.error(str(err))
    if extra_defaults is not None:
        merged = argparse.Namespace(**{**vars(partial), **file_values})
        # what the command line says still wins over extra defaults
        parser.set_defaults(**extra_defaults(merged))
    parser.set_defaults(**file_values)
    if overrides is not None:
        parser.set_defaults(**overrides(argparse.Namespace(**{**vars(partial), **file_values})))
    return parser.parse_args(argv)
