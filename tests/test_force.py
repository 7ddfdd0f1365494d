"""`quantize --force` never loses a file: it replaces only a previous output of ours,
refuses SRC, a folder holding SRC, a folder inside SRC and folders with other files, and
swaps the new output in atomically. Every refusal leaves the source and its neighbours
byte for byte as they were."""

import os
import shutil
import sys
from pathlib import Path

import pytest

from offload_engine.checkpoint import convert as convert_module
from offload_engine.checkpoint import destination
from offload_engine.checkpoint.convert import convert
from offload_engine.checkpoint.format import read_manifest, verify_directory
from offload_engine.cli import main
from offload_engine.errors import ConversionError
from offload_engine.quant.layout import QuantSpec


def _snapshot(root: Path) -> dict:
    """Relative path -> bytes of every file under ROOT (directories as None)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


@pytest.fixture
def models(tmp_path, qwen2_src):
    """models/src (a checkpoint), models/notes.txt (a neighbour), models/out (our output)."""
    root = tmp_path / "models"
    shutil.copytree(qwen2_src, root / "src")
    (root / "notes.txt").write_text("keep me")
    convert(root / "src", root / "out", progress=False)
    return root


@pytest.mark.parametrize("dst", ["src", ".", "src/q", "notes.txt"],
                         ids=["dst-is-src", "dst-contains-src", "dst-inside-src", "dst-is-file"])
def test_force_refuses_what_could_lose_files(models, dst, capsys):
    before = _snapshot(models)
    code = main(["quantize", str(models / "src"), str(models / dst), "--force", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("offload-engine: error:") and "Traceback" not in err
    assert _snapshot(models) == before


def test_force_refuses_a_directory_with_other_files(models, capsys):
    (models / "out" / "my-notes.md").write_text("mine")
    (models / "other").mkdir()
    (models / "other" / "weights.bin").write_bytes(b"\x00" * 10)
    before = _snapshot(models)
    for dst in ("out", "other"):
        assert main(["quantize", str(models / "src"), str(models / dst), "--force",
                     "--no-progress"]) == 2
        assert "holds other files" in capsys.readouterr().err
    assert _snapshot(models) == before


def test_force_replaces_a_previous_output_and_nothing_else(models, monkeypatch):
    exchanged = []
    real_exchange = destination._exchange
    monkeypatch.setattr(destination, "_exchange",
                        lambda a, b: exchanged.append(real_exchange(a, b)) or exchanged[-1])
    before = _snapshot(models)
    convert(models / "src", models / "out", QuantSpec("int8", 64), force=True, progress=False)
    assert verify_directory(models / "out").scheme == "int8"
    after = _snapshot(models)
    assert {k: v for k, v in after.items() if not k.startswith("out")} == \
        {k: v for k, v in before.items() if not k.startswith("out")}
    assert sorted(p.name for p in models.iterdir()) == ["notes.txt", "out", "src"]
    if sys.platform == "linux":
        assert exchanged == [True]  # one atomic renameat2 exchange, no window without DST


def test_failed_force_leaves_the_old_output_loadable(models, monkeypatch):
    before = _snapshot(models)

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_module, "_write_tensors", fail)
    with pytest.raises(KeyboardInterrupt):
        convert(models / "src", models / "out", QuantSpec("int8", 64), force=True,
                progress=False)
    assert _snapshot(models) == before
    assert read_manifest(models / "out").scheme == "int4-asym"


def test_swap_without_renameat2_falls_back_and_restores(models, tmp_path, monkeypatch):
    """Where the exchange is unavailable, two renames; a failed second one puts the old back."""
    monkeypatch.setattr(destination, "_exchange", lambda first, second: False)
    convert(models / "src", models / "out", QuantSpec("int8", 64), force=True, progress=False)
    assert verify_directory(models / "out").scheme == "int8"
    before = _snapshot(models)
    staging = tmp_path / "staging"
    staging.mkdir()
    real_rename = os.rename

    def rename(a, b):
        if Path(a) == staging:
            raise OSError(28, "No space left on device")
        real_rename(a, b)

    monkeypatch.setattr(destination.os, "rename", rename)
    with pytest.raises(ConversionError, match="old output is untouched"):
        destination.swap_into_place(staging, models / "out")
    assert _snapshot(models) == before


def test_unwritable_destination_is_one_line(models, monkeypatch, capsys):
    def read_only(self, *args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(Path, "mkdir", read_only)
    code = main(["quantize", str(models / "src"), str(models / "new" / "q"), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "Read-only file system" in err and "writable destination" in err


def test_destination_is_checked_before_the_source_is_read(models, monkeypatch):
    def unread(path):
        raise AssertionError("the source was opened before DST was checked")

    monkeypatch.setattr(convert_module, "open_source", unread)
    with pytest.raises(ConversionError, match="--force"):
        convert(models / "src", models / "out", progress=False)


def test_an_empty_directory_is_a_fine_destination(models):
    (models / "empty").mkdir()
    convert(models / "src", models / "empty", progress=False)
    verify_directory(models / "empty")
