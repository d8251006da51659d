"""Canary: the component folder `operator/` must never shadow the standard library's `operator`."""

import importlib
import sysconfig
from pathlib import Path


def test_import_operator_is_stdlib() -> None:
    import operator

    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    assert Path(operator.__file__).resolve().parent == stdlib
    assert operator.add(2, 3) == 5


def test_corral_operator_is_namespace_subpackage() -> None:
    mod = importlib.import_module("corral.operator")
    assert "operator" in Path(next(iter(mod.__path__))).parts[-3:]
