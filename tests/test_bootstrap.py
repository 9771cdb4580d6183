"""scripts/bootstrap.sh keeps a compatible torch that is already installed (scripts/torch_pin.py)."""

import importlib.util
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def torch_pin():
    spec = importlib.util.spec_from_file_location("torch_pin", ROOT / "scripts" / "torch_pin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("installed", "torch_version", "vision"),
    [
        ("2.13.0+cpu", "2.13.0+cpu", "0.28.0"),  # the CPU build from the PyTorch index: kept
        ("2.14.1", "2.14.1", "0.29.1"),  # a newer build in pyproject's range: kept, torchvision matched
        ("2.3.0", "2.3.0", "0.18.0"),  # the oldest supported
        ("2.2.2", "2.13.0", "0.28.0"),  # too old: the pin
        ("2.15.0", "2.15.0", "0.29.2"),  # the newest supported: torchvision's stable-ABI wheel, no 0.30
        ("2.16.0.dev20270101", "2.13.0", "0.28.0"),  # outside the range: the pin
        (None, "2.13.0", "0.28.0"),  # nothing installed: the pin
    ],
)
def test_installed_torch_in_range_is_kept(torch_pin, installed, torch_version, vision):
    assert torch_pin.choose(installed) == (torch_version, vision)


def test_range_and_pin_come_from_the_project_files(torch_pin):
    assert torch_pin.supported_range() == ((2, 3), (2, 16))
    assert torch_pin.pinned() == "2.13.0"


def test_script_prints_pip_constraints():
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "torch_pin.py"), "2.13.0+cpu"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == ["torch==2.13.0+cpu", "torchvision==0.28.0"]


def test_bootstrap_uses_the_chosen_pin():
    text = (ROOT / "scripts" / "bootstrap.sh").read_text()
    assert "scripts/torch_pin.py" in text and "ZQ_TORCH_INDEX" in text
    assert "-c constraints.txt" not in text  # the fixed pin would replace a compatible installed torch


def test_next_environment_bypasses_the_machines_pip_config_and_ci_runs_its_tier():
    script = (ROOT / "scripts" / "bootstrap_next.sh").read_text()
    assert "PIP_CONFIG_FILE=/dev/null" in script and "scripts/torch_pin.py" in script
    ci = (ROOT / ".ci" / "run").read_text()
    # after the README test command, before the conformance matrix
    assert ci.index('bash -c "$test_cmd"') < ci.index("bash scripts/bootstrap_next.sh") < ci.index("-m conformance")
    assert ".venv-next/bin/python -m pytest" in ci and "tests/test_parity*.py" in ci
    assert ".venv-next/" in (ROOT / ".gitignore").read_text().splitlines()
