"""Every ``python -m monai.bundle`` command the model card and the README give, as written: its
config files merge, its command-line overrides apply (nested ones included), the runner it names
exists, and the network builds. Parsing only; tests/test_bundle.py runs the workflows."""

from __future__ import annotations

import ast
import re
import shlex

import pytest
import torch
from fire.parser import DefaultParseValue
from monai.bundle import ConfigParser

from tests.bundle_utils import REPO

BUNDLE = REPO / "bundle"
DOCS = (BUNDLE / "docs" / "README.md", REPO / "README.md", *sorted((REPO / "experiments").rglob("NOTES.md")))
# arguments of monai.bundle's commands themselves, not config ids
CLI_ARGS = {"config_file", "meta_file", "logging_file", "bundle_root", "filepath", "ckpt_file", "input_shape",
            "use_trace", "converter_kwargs", "key_in_ckpt", "net_id", "tracking", "args_file"}  # fmt: skip


def _commands() -> list[tuple[str, str, list[str]]]:
    """(doc name, monai.bundle command, the arguments after it) for each command line in the docs
    (lines continued with a backslash joined; a mention in the prose has no --config_file)."""
    found = []
    for doc in DOCS:
        text = doc.read_text().replace("\\\n", " ")
        for line in text.splitlines():
            match = re.search(r"-m monai\.bundle (\w+) (.*?--config_file.*?)(?:&&|$)", line)
            if match:
                found.append((doc.name, match.group(1), shlex.split(match.group(2))))
    return found


def _parse(args: list[str]) -> tuple[list[str], dict[str, object]]:
    """(positional arguments, ``--key value`` pairs with values as fire reads them)."""
    positional, pairs, i = [], {}, 0
    while i < len(args):
        if args[i].startswith("--"):
            pairs[args[i][2:]] = DefaultParseValue(args[i + 1])
            i += 2
        else:
            positional.append(args[i])
            i += 1
    return positional, pairs


def test_the_docs_give_bundle_commands():
    commands = _commands()
    assert {c for _, c, _ in commands} >= {"run", "ckpt_export"}
    assert len([c for c in commands if c[1] == "run"]) >= 15


@pytest.mark.parametrize("doc, command, args", _commands(), ids=lambda v: " ".join(v[:5]) if isinstance(v, list) else v)
def test_a_documented_command_works_as_written(doc, command, args):
    positional, pairs = _parse(args)
    files = pairs["config_file"]
    files = [files] if isinstance(files, str) and not files.startswith("[") else files
    files = ast.literal_eval(files) if isinstance(files, str) else files
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / f) for f in files])  # commands are run from the bundle folder
    for key, value in pairs.items():
        if key not in CLI_ARGS:
            parser[key] = value  # as ConfigWorkflow applies overrides: before anything is parsed
    if command == "run":
        runner = positional[0] if positional else "run"
        assert runner in parser and "initialize" in parser, f"{doc}: {runner!r} is not in {files}"
    assert isinstance(parser.get_parsed_content(positional[0] if command != "run" else "network_def"), torch.nn.Module)
    if "train" in " ".join(files) and command == "run":
        assert isinstance(parser.get_parsed_content("train#trainer#amp"), bool)
