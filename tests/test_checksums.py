"""Checksums in the manifest: a same-size byte flip in a shard is caught by `inspect` and by
load, both naming the shard and the tensor; manifests without checksums still load."""

import hashlib
import json
import logging
import shutil

import pytest

from offload_engine.checkpoint import stfile
from offload_engine.checkpoint.checksums import tensor_crc
from offload_engine.checkpoint.format import MANIFEST_NAME, read_manifest
from offload_engine.cli import main
from offload_engine.errors import FormatError
from offload_engine.runtime.store import HostStore, read_dense_tensors

TARGET = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture
def copy(tmp_path, qwen2_q):
    target = tmp_path / "q"
    shutil.copytree(qwen2_q, target)
    return target


def _flip_middle_byte(directory, tensor_name, part):
    """Flip one byte in the middle of a component's data; the file keeps its size."""
    comp = read_manifest(directory).tensors[tensor_name].components[part]
    path = directory / comp.shard
    info = stfile.read_header(path)[comp.key]
    data = bytearray(path.read_bytes())
    size = len(data)
    data[(info.begin + info.end) // 2] ^= 0x5A
    path.write_bytes(bytes(data))
    assert path.stat().st_size == size
    return comp


def test_conversion_records_shard_and_tensor_checksums(qwen2_q):
    manifest = read_manifest(qwen2_q)
    sums = manifest.checksums
    assert sums["shard_algorithm"] == "sha256" and sums["tensor_algorithm"] == "crc32"
    assert set(sums["shards"]) == set(manifest.shards)
    for shard, digest in sums["shards"].items():
        assert hashlib.sha256((qwen2_q / shard).read_bytes()).hexdigest() == digest
    comp = manifest.tensors[TARGET].components["qweight"]
    stored = stfile.read_tensor(qwen2_q / comp.shard,
                                stfile.read_header(qwen2_q / comp.shard)[comp.key])
    assert sums["tensors"][comp.shard][comp.key] == tensor_crc(stored)


def test_inspect_names_shard_and_tensor_of_a_flipped_byte(copy, capsys):
    comp = _flip_middle_byte(copy, TARGET, "qweight")
    assert main(["inspect", str(copy), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert comp.shard in err and f"{TARGET}.qweight" in err and "checksum mismatch" in err
    assert "Traceback" not in err


def test_load_names_shard_and_tensor_of_a_flipped_byte(copy):
    comp = _flip_middle_byte(copy, TARGET, "scales")
    with pytest.raises(FormatError, match="checksum mismatch") as caught:
        HostStore.load(copy, progress=False)
    assert comp.shard in str(caught.value) and f"{TARGET}.scales" in str(caught.value)


def test_run_refuses_a_flipped_dense_tensor(copy, capsys):
    comp = _flip_middle_byte(copy, "model.embed_tokens.weight", "dense")
    with pytest.raises(FormatError, match="model.embed_tokens.weight"):
        list(read_dense_tensors(copy))
    code = main(["run", str(copy), "the", "-n", "2", "--device", "cpu", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert comp.shard in err and "checksum mismatch" in err


def test_manifest_without_checksums_loads_with_a_note(copy, caplog, capsys):
    path = copy / MANIFEST_NAME
    data = json.loads(path.read_text())
    del data["checksums"]
    path.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING):
        store = HostStore.load(copy, progress=False)
    assert len(store) == 2 * 7 + 1
    assert "no checksums" in caplog.text
    assert main(["inspect", str(copy), "--no-progress"]) == 0
    assert "shapes and sizes only" in capsys.readouterr().out


def test_checksum_cost_tool_measures_a_share_of_load_time(qwen2_q):
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parent.parent / "tools" / "checksum_cost.py"
    result = subprocess.run([sys.executable, str(tool), str(qwen2_q), "--repeat", "1", "--json"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    manifest = read_manifest(qwen2_q)
    assert report["checked_bytes"] == sum(e.nbytes for e in manifest.tensors.values())
    assert report["device"] == "cpu" and report["check_seconds"] > 0
    assert 0 < report["check_share"] < 1
