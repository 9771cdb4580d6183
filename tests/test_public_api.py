import subprocess
import sys

import zq_plugin


def test_all_is_exported():
    for name in zq_plugin.__all__:
        assert hasattr(zq_plugin, name), name


def test_import_stays_light():
    heavy = "('torchao', 'brevitas', 'onnx', 'matplotlib')"
    code = f"import sys, zq_plugin; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_errors_are_zqerrors_and_builtins():
    assert issubclass(zq_plugin.ConfigError, ValueError) and issubclass(zq_plugin.ConfigError, zq_plugin.ZQError)
    assert issubclass(zq_plugin.DatasetNotFoundError, FileNotFoundError)
    assert issubclass(zq_plugin.NotCalibratedError, RuntimeError)
    assert issubclass(zq_plugin.MissingDependencyError, ImportError)


def test_only_compat_imports_torch_ao_quantization():
    import pathlib
    import re

    root = pathlib.Path(zq_plugin.__file__).parent
    pattern = re.compile(r"^\s*(from|import)\s+torch\.ao\.quantization", re.MULTILINE)
    offenders = [p.name for p in root.rglob("*.py") if p.name != "_compat.py" and pattern.search(p.read_text())]
    assert offenders == []
