"""Triton kernels on the CPU: a fixture that imports a kernel module under Triton's interpreter
(TRITON_INTERPRET=1, numpy on CPU tensors), so CI checks the GPU kernels' math without a GPU.

`triton.jit` reads TRITON_INTERPRET when a kernel is decorated, so the module is reloaded with
the variable set, and reloaded again afterwards (a GPU test in the same process then gets the
compiled kernels back)."""

from __future__ import annotations

import importlib
import os

import pytest


def interpreted(*module_names: str):
    """A pytest fixture giving the named module reloaded under the interpreter (several names:
    all reloaded, the first given)."""

    @pytest.fixture
    def fixture():
        pytest.importorskip("triton", reason="triton is a test dependency (pip install -e .[dev])")
        old = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            mods = [importlib.reload(importlib.import_module(name)) for name in module_names]
            yield mods[0]
        finally:
            if old is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = old
            for name in module_names:
                importlib.reload(importlib.import_module(name))

    return fixture
