"""Every command in README.md and docs/*.md runs in a test, as written.

What counts as a command: each ``python`` block, each line of a ``bash`` block (continuation
lines joined, comments dropped) and each inline code span outside blocks that starts like a
shell command (``.venv/bin/``, ``time``, ``rm``, ``bash``, ``torchrun``, ``VAR=value``). Spans
such as ``zq plan`` in prose name a command and are not one; a span with ``...`` is a fragment.

How each runs (the table :data:`HOW` must name every command found, so a new one in the docs
fails here until it is tested):

- ``run``: in the default tier, in a scratch folder that stands for the repository root.
  ``.venv/bin/zq ARGS`` runs as ``zq_plugin.cli.main(ARGS)`` in this process (the console
  script calls exactly that; ``test_console_script`` runs the real one), and the Python blocks
  of a page run in order in one namespace. ``zq_plugin.synthesize`` is memoized on its
  arguments for the session: it is deterministic (docs/synthesis.md), so a repeated call
  returns what it would compute, and the README's 256-image ZeroQ set is made once.
- ``slow``: as written in a subprocess, under ``-m slow`` (minutes: the demo, the torchrun run).
- ``script``: a benchmark or training script (tens of minutes to hours): the script is
  imported and the documented arguments are parsed by its own parser; the run is not repeated.
- ``suite``: the test suite itself and the set-up script, which CI runs: the markers and paths
  they name must exist.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import re
import runpy
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import zq_plugin
from zq_plugin import cli, zoo

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^([ \t]*)```(\w*)[^\n]*\n(.*?)^\1```[ \t]*$", re.M | re.S)
COMMAND = re.compile(r"^(\.venv/bin/|time |rm -rf |bash |torchrun |[A-Z][A-Z0-9_]*=\S* )")


def _rel(doc: Path) -> str:
    return doc.relative_to(ROOT).as_posix()


def python_blocks(doc: Path) -> list[str]:
    """The ``python`` blocks of ``doc``, dedented, in order."""
    return [textwrap.dedent(m.group(3)) for m in FENCE.finditer(doc.read_text()) if m.group(2) == "python"]


def shell_commands(doc: Path) -> list[str]:
    """Commands of ``doc``: lines of shell blocks and command-like inline spans outside blocks."""
    text = doc.read_text()
    found: list[str] = []
    for m in FENCE.finditer(text):
        if m.group(2) not in ("bash", "sh", "shell", "console"):
            continue
        joined = textwrap.dedent(m.group(3)).replace("\\\n", " ")
        for line in joined.splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            if line:
                found.append(re.sub(r"\s+", " ", line))
    prose = FENCE.sub("", text)
    for span in re.findall(r"`([^`\n]+)`", prose):
        if COMMAND.match(span) and "..." not in span:
            found.append(span.strip())
    return found


def all_commands() -> list[tuple[str, str]]:
    return [(_rel(doc), cmd) for doc in DOCS for cmd in shell_commands(doc)]


# --------------------------------------------------------------------------- how each one runs
def how(command: str) -> str:
    """``run`` / ``slow`` / ``script`` / ``suite`` for one command (see the module docstring)."""
    parts = [p.strip() for p in command.split("&&")]
    kinds = set()
    for part in parts:
        words = _strip_env(part)
        if not words:
            continue
        if words[:2] in (["bash", "scripts/bootstrap.sh"], ["bash", "scripts/bootstrap_next.sh"]) or "pytest" in words:
            kinds.add("suite")
        elif words[0] in ("torchrun",) or words[:2] == [".venv/bin/zq", "demo"]:
            kinds.add("slow")
        elif words[0] == ".venv/bin/python" and (
            words[1].startswith("benchmarks/") or words[1:3] == ["-m", "zq_plugin.zoo.train"]
        ):
            kinds.add("script")
        elif words[0] in (".venv/bin/zq", "rm"):
            kinds.add("run")
        else:
            kinds.add("unknown")
    # a chain is as slow as its slowest part; the set-up part of "bootstrap && X" is CI's own
    for kind in ("unknown", "slow", "script", "run", "suite"):
        if kind in kinds:
            return kind
    return "unknown"


def _strip_env(part: str) -> list[str]:
    """Words of a command without leading ``time`` and ``VAR=value`` assignments."""
    words = shlex.split(part)
    while words and (words[0] == "time" or re.match(r"^[A-Z][A-Z0-9_]*=", words[0])):
        words = words[1:]
    return words


def _env_of(part: str) -> dict[str, str]:
    env = {}
    for word in shlex.split(part):
        match = re.match(r"^([A-Z][A-Z0-9_]*)=(.*)$", word)
        if word == "time":
            continue
        if not match:
            break
        env[match.group(1)] = match.group(2)
    return env


def test_every_command_is_one_we_know_how_to_run():
    unknown = [(doc, cmd) for doc, cmd in all_commands() if how(cmd) == "unknown"]
    assert not unknown, f"commands in the docs that no test runs: {unknown}"
    assert len(all_commands()) >= 20  # the extraction finds the docs' commands


# --------------------------------------------------------------------------- the scratch root
@pytest.fixture(scope="module")
def memo_synthesize():
    """``zq_plugin.synthesize`` memoized on (weights, method, arguments) for this module."""
    import zq_plugin.demo
    from zq_plugin import synth
    from zq_plugin.data import model_fingerprint

    real = synth.api.synthesize
    cache: dict[str, object] = {}

    signature = inspect.signature(real)

    def memo(model, method="zeroq", **kw):
        # bound with defaults, so the README's call and the CLI's (explicit defaults) share one entry
        bound = signature.bind(model, method, **kw)
        bound.apply_defaults()
        options = {**bound.arguments.pop("options", {}), **bound.arguments.pop("kwargs", {})}
        args = {k: v for k, v in {**bound.arguments, **options}.items() if k not in ("model", "progress", "cache_dir")}
        items = sorted((k, repr(tuple(v) if isinstance(v, list) else v)) for k, v in args.items())
        key = repr((model_fingerprint(model), items))
        if key not in cache:
            cache[key] = real(model, method, **kw)
        return cache[key]

    patcher = pytest.MonkeyPatch()
    for module in (zq_plugin, synth, synth.api, cli, zq_plugin.demo):
        patcher.setattr(module, "synthesize", memo)
    yield memo
    patcher.undo()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A scratch folder standing for the repository root (``.venv``, scripts and benchmarks linked)."""
    path = tmp_path_factory.mktemp("repo")
    for name in (".venv", "scripts", "benchmarks", "tests", "pyproject.toml"):
        if (ROOT / name).exists():
            (path / name).symlink_to(ROOT / name)
    return path


def run_zq(words: list[str], root: Path, capsys) -> str:
    """``.venv/bin/zq ARGS`` as the console script runs it; returns its stdout."""
    cwd = os.getcwd()
    os.chdir(root)
    try:
        rc = cli.main(words[1:])
    finally:
        os.chdir(cwd)
    captured = capsys.readouterr()
    assert rc == 0, f"{shlex.join(words)} exited {rc}: {captured.err[-2000:]}"
    return captured.out


# --------------------------------------------------------------------------- README, in order
def test_readme_runs_as_written(root, memo_synthesize, capsys, monkeypatch):
    """README's Python steps, then its shell steps, in the order a reader follows them."""
    monkeypatch.chdir(root)
    ns: dict[str, object] = {}
    for block in python_blocks(ROOT / "README.md"):
        exec(compile(block, "README.md", "exec"), ns)
    assert ns["data"].images.shape == (256, 1, 28, 28)
    assert isinstance(ns["int8_model"], torch.nn.Module) and isinstance(ns["int8"], torch.nn.Module)
    assert ns["result"].plan.average_w_bits() <= 4.0 + 1e-9
    assert ns["logits"].shape == (10000, 10)
    for cmd in shell_commands(ROOT / "README.md"):
        if how(cmd) == "run":
            for part in cmd.split("&&"):
                run_part(part.strip(), root, capsys)
    # issue 14: the README's `zq plan` (no --evaluate) crashed after plan.json, before frontier.json
    frontier = json.loads((root / "zq_out" / "plan" / "frontier.json").read_text())
    assert len(frontier["measured"]) >= 2 and frontier["measured"][-1]["chosen"]
    assert (root / "zq_out" / "plan" / "frontier.png").exists()
    assert not any((ROOT / name).exists() for name in ("resnet_s-zeroq.pt", "plan", "model.onnx"))


def run_part(part: str, root: Path, capsys) -> str:
    words = _strip_env(part)
    if words[0] == "rm":
        subprocess.run(words, cwd=root, check=True)
        return ""
    assert words[0] == ".venv/bin/zq", part
    return run_zq(words, root, capsys)


# --------------------------------------------------------------------------- docs pages
PAGES = [doc for doc in DOCS if doc.name != "README.md" and python_blocks(doc)]


@pytest.mark.parametrize("doc", PAGES, ids=[d.name for d in PAGES])
def test_docs_python_runs_as_written(doc, root, memo_synthesize, monkeypatch):
    """Each page's Python blocks in order, continuing README's steps 1 and 2 (``model``, ``data``)."""
    monkeypatch.chdir(root)
    model = zoo.load("resnet_s")
    data = zq_plugin.synthesize(model, method="zeroq", num_samples=256, input_shape=(1, 28, 28), seed=0)
    ns: dict[str, object] = {"zq_plugin": zq_plugin, "torch": torch, "model": model, "data": data}
    for block in python_blocks(doc):
        exec(compile(block, _rel(doc), "exec"), ns)


RUN_COMMANDS = [(doc, cmd) for doc, cmd in all_commands() if how(cmd) == "run" and doc != "README.md"]


def test_docs_shell_commands_run_as_written(root, memo_synthesize, capsys):
    """The docs pages' own ``run`` commands (README's run in :func:`test_readme_runs_as_written`)."""
    for _doc, cmd in RUN_COMMANDS:
        for part in cmd.split("&&"):
            run_part(part.strip(), root, capsys)


SCRIPT_COMMANDS = sorted({cmd for _, cmd in all_commands() if how(cmd) == "script"})


@pytest.mark.parametrize("cmd", SCRIPT_COMMANDS)
def test_script_commands_parse(cmd, monkeypatch):
    """The script exists, imports, and its own parser takes the documented arguments."""
    words = _strip_env(cmd.split("&&")[-1].strip())
    parsed: list[argparse.Namespace] = []
    original = argparse.ArgumentParser.parse_args

    class Parsed(Exception):
        pass

    def parse_only(self, args=None, namespace=None):
        parsed.append(original(self, args, namespace))
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    if words[1] == "-m":
        module, argv = words[2], words[3:]
        source = Path(zq_plugin.__file__).parent.parent.joinpath(*module.split(".")).with_suffix(".py").read_text()
    else:
        script = ROOT / words[1]
        assert script.is_file(), f"{cmd}: no {words[1]}"
        module, argv, source = str(script), words[2:], script.read_text()
        monkeypatch.syspath_prepend(str(script.parent))  # as `python script.py` puts its folder first
    takes_arguments = "parse_args" in source
    if not takes_arguments:  # import only: running it would be the benchmark itself
        assert not argv, f"{cmd}: the script takes no arguments"
    monkeypatch.setattr(sys, "argv", [module, *argv])
    run_name = "__main__" if takes_arguments else "docs_check"
    with pytest.raises(Parsed) if takes_arguments else contextlib.nullcontext():
        if words[1] == "-m":
            runpy.run_module(module, run_name=run_name, alter_sys=True)
        else:
            runpy.run_path(module, run_name=run_name)
    assert len(parsed) == (1 if takes_arguments else 0)


SUITE_COMMANDS = sorted({cmd for _, cmd in all_commands() if how(cmd) == "suite"})


@pytest.mark.parametrize("cmd", SUITE_COMMANDS)
def test_suite_commands_name_what_exists(cmd):
    text = (ROOT / "pyproject.toml").read_text()
    for part in cmd.split("&&"):
        words = _strip_env(part.strip())
        if words[:1] == ["bash"] and words[1:2] in (["scripts/bootstrap.sh"], ["scripts/bootstrap_next.sh"]):
            assert (ROOT / words[1]).is_file()
            continue
        assert words[:3] == [".venv/bin/python", "-m", "pytest"], part
        for i, word in enumerate(words):
            if word == "-m" and i > 2:
                assert f'"{words[i + 1]}:' in text, f"{part}: marker {words[i + 1]} is not registered"
            elif word.startswith("tests/"):
                assert (ROOT / word.split("::")[0]).exists(), part
        env = _env_of(part.strip())
        if "HYPOTHESIS_PROFILE" in env:
            assert env["HYPOTHESIS_PROFILE"] in (ROOT / "tests" / "conftest.py").read_text()


def test_console_script():
    """The ``zq`` the docs call is the console script of ``zq_plugin.cli:main``."""
    exe = Path(sys.executable).parent / "zq"
    if not exe.exists():
        pytest.skip("no zq console script next to this interpreter")
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().startswith("zq")


SLOW_COMMANDS = sorted({cmd for _, cmd in all_commands() if how(cmd) == "slow"})


@pytest.mark.slow
@pytest.mark.parametrize("cmd", SLOW_COMMANDS)
def test_slow_commands_run_as_written(cmd, tmp_path):
    """As a user runs them from the repository root, with the environment activated (``torchrun``)."""
    for name in (".venv", "scripts", "benchmarks", "pyproject.toml"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = {**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
