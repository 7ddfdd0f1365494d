"""tools/load_test.py against the tiny Qwen2: bounded, loopback, every request answered."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

TOOL = Path(__file__).resolve().parent.parent / "tools" / "load_test.py"


def test_load_test_prints_a_table_without_errors(qwen2_q, capsys):
    spec = importlib.util.spec_from_file_location("load_test", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules["load_test"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    assert module.main([str(qwen2_q), "--device", "cpu", "--no-progress",
                        "--concurrency", "1", "3", "--requests", "3", "--max-tokens", "4"]) == 0
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines()
            if line.startswith("| 1 ") or line.startswith("| 3 ")]
    assert [row[1].strip() for row in rows] == ["1", "3"]
    for row in rows:
        assert row[2].strip() == "3 x 4 tokens" and row[-2].strip() == "0"  # no errors
        assert float(row[4]) > 0  # tokens/s
