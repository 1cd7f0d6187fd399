"""The commands in the documentation, checked against the tools they run.

For every fenced code block of README.md, docs/**/*.md and configs/README.md, every command that
runs one of this project's tools (`python X.py`, `python -m fcmae.X`, `accelerate launch ... X.py`
or `-m fcmae.X`, `torchrun ... X.py`, an `fcmae-*` console script of setup.cfg) must parse: the tool's `--help`
exits 0 and names each `--flag` the command gives it. Flags before the script of a launcher
belong to the launcher and are checked against the launcher's own help.

Shell handling: line continuations, comments, `&&` / `||` / `;` / `|` / `&` chains, `VAR=value`
prefixes, `bash -c "..."` (checked inside), and `...` placeholders. Each tool's help is made once,
in this process (torch and timm are imported once, not once per tool).
"""
import configparser
import contextlib
import functools
import io
import re
import runpy
import shlex
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEPARATORS = {"&&", "||", ";", "|", "&", ";;", "(", ")"}
SHELL_BLOCKS = {"", "bash", "sh", "shell", "console"}
FLAG = re.compile(r"^--[A-Za-z][\w-]*")


def doc_files(root=ROOT):
    """README.md, every page under docs/ and configs/README.md."""
    return [root / "README.md", *sorted((root / "docs").rglob("*.md")), root / "configs" / "README.md"]


def fenced_blocks(text):
    """(language, body, first line number) of each fenced code block."""
    blocks = []
    for match in re.finditer(r"^([ \t]*)```([\w+-]*)[^\n]*\n(.*?)^\1```", text, re.S | re.M):
        line = text.count("\n", 0, match.start()) + 2
        blocks.append((match.group(2).lower(), match.group(3), line))
    return blocks


def logical_lines(body):
    """The lines of a shell block with backslash continuations joined."""
    return re.sub(r"\\\n", " ", body).splitlines()


def split_commands(line):
    """The simple commands of one shell line, as token lists (comments dropped)."""
    line = re.sub(r"\$\(\([^()]*\)\)", "0", line)      # $((arithmetic)): a value
    line = re.sub(r"\$\([^()]*\)", "VALUE", line)       # $(command substitution): a value
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        tokens = list(lexer)
    except ValueError:  # unbalanced quotes: not a command this checker can read
        return []
    commands, current = [], []
    for token in tokens:
        if token in SEPARATORS:
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    result = []
    for command in filter(None, commands):
        while command and re.match(r"^[A-Za-z_]\w*=", command[0]):  # VAR=value prefixes
            command = command[1:]
        if "bash" in command:  # bash -c "...": the command inside
            at = command.index("bash")
            if command[at + 1:at + 2] == ["-c"] and len(command) > at + 2:
                result.extend(split_commands(command[at + 2]))
                continue
        if command:
            result.append(command)
    return result


@dataclass
class Use:
    """One tool run by one command: the tool, the flags given to it, the launcher and its flags."""
    tool: str            # "pretrain.py", "benchmarks/gpu/run.py", "fcmae.bench", "fcmae-curves"
    flags: list
    launcher: str = ""   # "accelerate launch", "torchrun" or ""
    launcher_flags: tuple = ()
    where: str = ""
    text: str = ""


def flags_in(tokens):
    return [FLAG.match(t).group(0) for t in tokens if FLAG.match(t)]


@functools.lru_cache(maxsize=1)
def console_scripts():
    """{fcmae-<name>: "module:function"} from setup.cfg."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = config["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict((part.strip() for part in line.split("=", 1)) for line in lines if "=" in line)


def is_project_script(token):
    return token.endswith(".py") and not token.startswith(("/", "~", "$"))


def tool_use(command):
    """The Use of a command that runs a project tool, or None."""
    head, rest = command[0], command[1:]
    if head in console_scripts():
        return Use(head, flags_in(rest))
    if head.startswith("fcmae-"):
        return Use(head, flags_in(rest))  # not a console script: reported by check_use
    if re.fullmatch(r"python(3(\.\d+)?)?", head):
        if rest[:1] == ["-m"] and len(rest) > 1:
            if rest[1].startswith("fcmae.") or rest[1] == "fcmae":
                return Use(rest[1], flags_in(rest[2:]))
            return None  # venv, pip, http.server, ...: not this project's
        if rest and is_project_script(rest[0]):
            return Use(rest[0], flags_in(rest[1:]))
        return None
    if head == "accelerate" and rest[:1] == ["launch"]:
        launcher, args = "accelerate launch", rest[1:]
    elif head == "torchrun":
        launcher, args = "torchrun", rest
    else:
        return None
    for i, token in enumerate(args):
        if is_project_script(token):
            return Use(token, flags_in(args[i + 1:]), launcher, tuple(flags_in(args[:i])))
        if token == "-m" and i + 1 < len(args) and args[i + 1].startswith("fcmae."):  # a launched module
            return Use(args[i + 1], flags_in(args[i + 2:]), launcher, tuple(flags_in(args[:i])))
    return None


def uses_in(path):
    """Every Use in the shell blocks of the file at `path`."""
    text = Path(path).read_text()
    uses = []
    for language, body, first in fenced_blocks(text):
        if language not in SHELL_BLOCKS:
            continue
        for offset, line in enumerate(logical_lines(body)):
            for command in split_commands(line):
                use = tool_use(command)
                if use is not None:
                    use.where = f"{Path(path).name}, block at line {first}"
                    use.text = " ".join(command)[:200]
                    uses.append(use)
    return uses


def _captured(call):
    """(exit code, stdout) of call(), which is expected to print its help and exit."""
    out = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            call()
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    return code, out.getvalue()


@functools.lru_cache(maxsize=None)
def help_of(tool):
    """(exit code, help text) of `tool --help`, made once per tool, in this process."""
    if tool in ("accelerate launch", "torchrun"):  # the launchers' option strings, from their parsers
        if tool == "accelerate launch":
            from accelerate.commands.launch import launch_command_parser as get_args_parser
        else:
            from torch.distributed.run import get_args_parser
        return 0, " ".join(s for action in get_args_parser()._actions for s in action.option_strings)
    if tool in console_scripts():
        module, function = console_scripts()[tool].split(":")

        def call():
            __import__(module)
            getattr(sys.modules[module], function)(["--help"])
        return _captured(call)
    if tool.startswith("fcmae"):
        def call():
            argv = sys.argv
            sys.argv = [tool, "--help"]
            try:
                runpy.run_module(tool, run_name="__main__", alter_sys=False)
            finally:
                sys.argv = argv
        return _captured(call)
    script = ROOT / tool
    if not script.is_file():
        return 2, ""

    def call():
        argv, path = sys.argv, list(sys.path)
        sys.argv = [str(script), "--help"]
        sys.path.insert(0, str(script.parent))
        try:
            runpy.run_path(str(script), run_name="__main__")
        finally:
            sys.argv, sys.path[:] = argv, path
    return _captured(call)


def named(flag, text):
    return re.search(r"(?<![\w-])" + re.escape(flag) + r"(?![\w-])", text) is not None


def check_use(use):
    """Problems (sentences) of one Use."""
    problems = []
    if use.tool.startswith("fcmae-") and use.tool not in console_scripts():
        return [f"{use.where}: {use.tool} is not a console script of setup.cfg: {use.text}"]
    if use.launcher:
        code, text = help_of(use.launcher)
        for flag in use.launcher_flags:
            if not named(flag, text):
                problems.append(f"{use.where}: {use.launcher} has no {flag}: {use.text}")
    code, text = help_of(use.tool)
    if code != 0 or not text:
        return problems + [f"{use.where}: `{use.tool} --help` exited {code}: {use.text}"]
    for flag in use.flags:
        if not named(flag, text):
            problems.append(f"{use.where}: {use.tool} has no {flag}: {use.text}")
    return problems


def check_files(paths):
    """(problems, number of commands checked) over the files at `paths`."""
    problems, count = [], 0
    for path in paths:
        for use in uses_in(path):
            count += 1
            problems.extend(check_use(use))
    return problems, count
