"""The GPU check runs end to end on the CPU with tiny shapes, ready for a GPU session."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_tiny_on_cpu(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks/gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "gpu.md"
    assert module.main(["--device", "cpu", "--tiny", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert table.count("| plain |") == 2 and table.count("| lisa |") == 2
    assert "# GPU check" in out.read_text()
