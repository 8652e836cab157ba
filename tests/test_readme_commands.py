"""The commands the README and the tools' --help texts print work as printed (issue 27).

Whatever README.md holds when the tests run: its fenced blocks and the tools' docstrings are scanned for
`python tools/X.py ...` / `torchrun ... tools/X.py ...` commands. Every configs/*.yaml and tools/*.py they
name exists; every command parses with its tool's own parser (a sketch with `...`, `[--opt]` or `a|b` only
needs its flags to be the tool's); train_net's overrides are known keys of the right types; and the
train_net commands that need nothing but shipped files and the CPU (the easy-VQA ones) run, at tiny size.
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOLS = sorted((REPO / "tools").glob("*.py"))
TOOL_IN_COMMAND = re.compile(r"^(?:\S*/)?tools/(\w+)\.py$")
NAMED_FILE = re.compile(r"(?<![\w/.])((?:configs|tools)/[\w./-]+\.(?:yaml|py))\b")
# Appended to a command that is run: a few steps on a few tiny images, whatever the config says.
TINY = ["SOLVER.MAX_EPOCHS", "0", "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.GRAD_ACCUM_STEPS", "1", "SOLVER.CHECKPOINT_PERIOD", "2", "DATASETS.TRAIN_LIMIT", "30",
        "DATASETS.TEST_LIMIT", "20", "DATALOADER.NUM_WORKERS", "0", "INPUT.MIN_SIZE_TRAIN", "[64]",
        "INPUT.MAX_SIZE_TRAIN", "64", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64"]


@dataclass(frozen=True)
class Command:
    source: str  # "README.md" or "tools/X.py --help"
    text: str
    tool: str
    args: tuple[str, ...]

    @property
    def sketch(self) -> bool:
        """`--config-file ...`, `[--features]`, `lmdb|npz`: an outline, not a command to run as it is."""
        return any(a == "..." or a.startswith("[") or "|" in a for a in self.args)


def _lines(block: str) -> list[str]:
    """The block's lines with backslash continuations joined."""
    return [line.strip() for line in re.sub(r"\\\n", " ", block).splitlines() if line.strip()]


def _command(source: str, line: str) -> Command | None:
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return None
    for i, word in enumerate(words):
        m = TOOL_IN_COMMAND.match(word)
        if m and (words[0] == "torchrun" or "python" in Path(words[0]).name):
            return Command(source, line, m.group(1), tuple(words[i + 1:]))
    return None


def _help_texts() -> dict[str, str]:
    """Each tool's docstring (its --help description) and help strings: its whole source text."""
    return {f"tools/{p.name} --help": p.read_text(encoding="utf-8") for p in TOOLS}


def readme_blocks() -> list[str]:
    """The README's fenced blocks: what a reader copies into a shell."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    return re.findall(r"^```[^\n]*\n(.*?)^```", readme, re.S | re.M)


def collect_commands() -> list[Command]:
    blocks = [("README.md", b) for b in readme_blocks()]
    for path in TOOLS:
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        blocks.append((f"tools/{path.name} --help", doc))
    found = [_command(source, line) for source, block in blocks for line in _lines(block)]
    return [c for c in found if c is not None]


COMMANDS = collect_commands()


def _ids(commands: list[Command]) -> list[str]:
    return [f"{c.source}: {c.text[:70]}" for c in commands]


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"_readme_tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Parsed(Exception):
    def __init__(self, parser: argparse.ArgumentParser, argv: list[str]):
        self.parser, self.argv = parser, argv


def tool_parser(name: str, args: tuple[str, ...], monkeypatch) -> tuple[argparse.ArgumentParser, list[str]]:
    """The parser the tool's entry point builds, and the words it hands to it (train_net moves its flags
    in front of the overrides first): the entry point is stopped right there, before it does any work."""
    module = load_tool(name)
    entry = getattr(module, "cli", None) or module.main

    def stop(parser, argv=None, namespace=None):
        raise _Parsed(parser, list(argv))

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", stop)
        with pytest.raises(_Parsed) as caught:
            entry(list(args))
    return caught.value.parser, caught.value.argv


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    """Every flag of the parser and of its sub-commands' parsers."""
    found = set(parser._option_string_actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= option_strings(sub)
    return found


def test_the_readme_and_the_help_texts_hold_tool_commands():
    """The scan finds what it is meant to check (train_net's own --help always holds commands)."""
    assert any(c.tool == "train_net" and c.source.startswith("tools/train_net.py") for c in COMMANDS)


@pytest.mark.parametrize("source,text", [("README.md fenced blocks", "\n".join(readme_blocks())),
                                         *_help_texts().items()])
def test_every_config_and_tool_named_exists(source, text):
    missing = sorted({f for f in NAMED_FILE.findall(text) if not (REPO / f).is_file()})
    assert not missing, f"{source} names files that do not exist: {missing}"


@pytest.mark.parametrize("command", COMMANDS, ids=_ids(COMMANDS))
def test_every_command_parses_as_printed(command, monkeypatch):
    assert (REPO / "tools" / f"{command.tool}.py").is_file(), f"{command.source}: no tools/{command.tool}.py"
    parser, argv = tool_parser(command.tool, command.args, monkeypatch)
    if command.sketch:  # every flag it shows must be one the tool has
        flags = {m.group(1) for a in command.args for m in [re.match(r"^\[?(--?[\w-]+)", a)] if m}
        unknown = sorted(flags - option_strings(parser))
        assert not unknown, f"{command.source}: `{command.text}` shows flags the tool lacks: {unknown}"
        return
    try:
        ns = argparse.ArgumentParser.parse_args(parser, argv)
    except SystemExit:
        pytest.fail(f"{command.source}: `{command.text}` does not parse (tools/{command.tool}.py)")
    if command.tool == "train_net":  # the overrides: KEY VALUE pairs of known keys and the right types
        from e2e_vl.config import get_train_cfg

        get_train_cfg().merge_from_list(ns.opts)


def _in_repo(args: tuple[str, ...]) -> list[str]:
    """The command's words with the shipped files it names made absolute (it runs in a scratch folder)."""
    return [str(REPO / a) if NAMED_FILE.fullmatch(a) else a for a in args]


def _runnable(command: Command, train_net) -> bool:
    """A train_net command whose config loads (every file it names is shipped) and asks for the CPU and
    the easy-VQA data, which the package generates: nothing to download, no GPU."""
    from e2e_vl.config import ConfigError

    if command.tool != "train_net" or command.sketch:
        return False
    try:
        cfg = train_net.setup_cfg(train_net.parse_args([*_in_repo(command.args), *TINY]))
    except ConfigError:
        return False
    return cfg.MODEL.DEVICE == "cpu" and cfg.DATASETS.TRAIN.startswith("easy_vqa")


def test_the_cheap_commands_run_at_tiny_size(tmp_path, train_net, monkeypatch):
    """In the order printed (a --resume or --eval-only follows its training run), in a scratch folder so
    that relative output folders stay out of the checkout. Chosen in that folder too: a config that reads
    a relative file (the demo's stage-1 `output/easy_vqa/detector.pth`) is then never runnable, whether
    or not the checkout has run `make demo`."""
    monkeypatch.chdir(tmp_path)
    runnable = [c for c in COMMANDS if _runnable(c, train_net)]
    assert any(c.source.startswith("tools/train_net.py") for c in runnable)
    for command in runnable:
        assert train_net.cli([*_in_repo(command.args), *TINY]) == 0, f"{command.source}: `{command.text}`"
