"""fedlora/ (the core) never imports flwr: Flower lives in strategies/, clients/ and simulations/."""

from __future__ import annotations

import subprocess
import sys

CORE_MODULES = ["fedlora", "fedlora.experiment", "fedlora.privacy", "fedlora.lora_client", "fedlora.aggregation",
                "fedlora.lora_math", "fedlora.export", "fedlora.data", "fedlora.models", "fedlora.training"]


def test_core_does_not_import_flwr():
    code = (f"import sys\nfor m in {CORE_MODULES!r}: __import__(m)\n"
            "print(sorted(m for m in sys.modules if m == 'flwr' or m.startswith('flwr.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out


def test_probe_detects_flwr_imports():
    code = "import sys, strategies\nprint(any(m == 'flwr' for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "True"  # the same probe sees flwr when a Flower module is imported
