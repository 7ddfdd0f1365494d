"""Bytes and files that are wrong in ways size checks miss: each is caught, named, and
refused with one line (exit 2 from the CLI), before any work where it can be."""

from __future__ import annotations

import shutil

import pytest

from offload_engine import load
from offload_engine.checkpoint.format import read_manifest
from offload_engine.errors import WorkerError
from tests.test_disk_tier import _greedy, _sizes


def _disk_component(engine, directory):
    """(shard path, component key, weight name) of a weight the disk tier reads every pass."""
    manifest = read_manifest(directory)
    on_disk = set(engine.host_plan.on_disk)
    for name, entry in manifest.tensors.items():
        if entry.quantized and name.removesuffix(".weight") in on_disk | {name}:
            comp = next(iter(entry.components.values()))
            return directory / comp.shard, comp.key, name
    raise AssertionError(f"no weight on disk among {sorted(on_disk)[:3]}")


def test_bytes_changed_in_place_on_the_disk_tier_are_named(qwen2_q, tmp_path):
    """Same size, same inode, different bytes: the disk tier's per-read CRC catches it."""
    from offload_engine.checkpoint import stfile

    copy = tmp_path / "q"
    shutil.copytree(qwen2_q, copy)
    _, minimum = _sizes(copy, gpu_budget="260KB")
    with load(copy, progress=False,
              dtype="float32", gpu_budget="260KB", host_budget=minimum) as engine:
        assert engine.host_plan.on_disk
        _greedy(engine, 2)
        assert engine.counters()["disk_verify_seconds"] > 0
        shard, key, _ = _disk_component(engine, copy)
        info = stfile.read_header(shard)[key]
        with open(shard, "r+b") as handle:  # flip one byte in the middle of the tensor
            handle.seek(info.begin + info.nbytes // 2)
            byte = handle.read(1)
            handle.seek(info.begin + info.nbytes // 2)
            handle.write(bytes([byte[0] ^ 0xFF]))
        with pytest.raises(WorkerError) as caught:
            _greedy(engine, 4)
    message = str(caught.value)
    assert str(shard) in message and repr(key) in message and "checksum mismatch" in message


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("offload-engine: error:"), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


RUN = ["-n", "2", "--device", "cpu", "--no-progress"]


def _rewrite(directory, name: str, part: str, edit) -> str:
    """Apply ``edit`` to one stored tensor and re-record sizes and checksums, as a file
    written that way by a buggy tool would have them; returns the component's key."""
    import json

    from safetensors.torch import load_file, save_file

    from offload_engine.checkpoint import checksums
    from offload_engine.checkpoint.format import MANIFEST_NAME

    manifest = read_manifest(directory)
    comp = manifest.tensors[name].components[part]
    shard = directory / comp.shard
    tensors = load_file(shard)
    edit(tensors[comp.key])
    save_file(tensors, shard)
    data = json.loads((directory / MANIFEST_NAME).read_text())
    data["shards"][comp.shard] = shard.stat().st_size
    data["checksums"] = checksums.record(directory, list(data["shards"]))
    (directory / MANIFEST_NAME).write_text(json.dumps(data))
    return comp.key


def _first(directory, role: str) -> str:
    return next(n for n, e in read_manifest(directory).tensors.items() if e.role == role)


@pytest.mark.parametrize("role,part", [("embedding", "dense"), ("norm", "dense"),
                                       ("linear", "scales")])
def test_non_finite_values_with_good_checksums_refused_at_load(q_copy, capsys, role, part):
    name = _first(q_copy, role)
    _rewrite(q_copy, name, part, lambda t: t.view(-1)[3:5].fill_(float("nan")))
    from offload_engine.cli import main

    assert main(["run", str(q_copy), "hi", *RUN]) == 2
    _one_line_error(capsys, repr(name), "non-finite", "re-convert")


@pytest.fixture
def q_copy(tmp_path, qwen2_q):
    target = tmp_path / "q"
    shutil.copytree(qwen2_q, target)
    return target


def _edit_manifest(directory, edit) -> None:
    import json

    from offload_engine.checkpoint.format import MANIFEST_NAME

    path = directory / MANIFEST_NAME
    data = json.loads(path.read_text())
    edit(data["tensors"])
    path.write_text(json.dumps(data))


def _drop_linear(tensors):
    del tensors[next(n for n, e in tensors.items() if e["role"] == "linear")]


def _add_linear(tensors):
    name, entry = next((n, e) for n, e in tensors.items() if e["role"] == "linear")
    tensors[name.replace(".weight", "_extra.weight")] = entry


def _drop_all_but_one_layer(tensors):
    for name in [n for n, e in tensors.items() if e["role"] == "linear"
                 and not n.startswith("model.layers.0.")]:
        del tensors[name]


@pytest.mark.parametrize("fault,needles", [
    ("tokenizer", ["no tokenizer files"]),
    ("linear removed", ["1 missing", "0 unexpected"]),
    ("linear added", ["0 missing", "1 unexpected", "_extra"]),
    ("nan scales", ["non-finite", "scales"]),
])
def test_inspect_refuses_what_run_refuses(q_copy, capsys, fault, needles):
    from offload_engine.cli import main

    if fault == "tokenizer":
        for name in ("tokenizer.json", "vocab.json"):
            (q_copy / name).unlink(missing_ok=True)
    elif fault == "linear removed":
        _edit_manifest(q_copy, _drop_linear)
    elif fault == "linear added":
        _edit_manifest(q_copy, _add_linear)
    else:
        _rewrite(q_copy, _first(q_copy, "linear"), "scales",
                 lambda t: t.view(-1)[0:1].fill_(float("inf")))
    assert main(["run", str(q_copy), "hi", *RUN]) == 2
    run_error = _one_line_error(capsys, *needles)
    assert main(["inspect", str(q_copy), "--no-progress"]) == 2
    assert _one_line_error(capsys, *needles) == run_error


def test_layer_mismatch_says_how_many_more(q_copy, capsys):
    from offload_engine.cli import main

    _edit_manifest(q_copy, _drop_all_but_one_layer)
    total = len([n for n, e in read_manifest(q_copy).tensors.items() if e.role == "linear"])
    assert main(["inspect", str(q_copy), "--no-progress"]) == 2
    err = _one_line_error(capsys, "missing:", "more;")
    missing = int(err.split(" missing:")[0].rsplit("(", 1)[1])
    assert missing > 3 and f"and {missing - 3} more" in err and total == 7


def test_inspect_passes_a_good_directory(qwen2_q, capsys):
    from offload_engine.cli import main

    assert main(["inspect", str(qwen2_q), "--no-progress"]) == 0
    assert "loadable: config, tokenizer files" in capsys.readouterr().out


@pytest.mark.parametrize("which", ["source", "quantized"])
def test_plan_refuses_a_config_with_more_layers_than_its_shards(tmp_path, qwen2_src, qwen2_q,
                                                                capsys, which):
    import json

    from offload_engine.cli import main

    copy = tmp_path / which
    shutil.copytree(qwen2_src if which == "source" else qwen2_q, copy)
    assert main(["plan", str(copy)]) == 0
    capsys.readouterr()
    config = json.loads((copy / "config.json").read_text())
    layers = config["num_hidden_layers"]
    config["num_hidden_layers"] = layers + 2
    config.pop("layer_types", None)  # per-layer list; a config for more layers has more
    (copy / "config.json").write_text(json.dumps(config))
    assert main(["plan", str(copy)]) == 2
    _one_line_error(capsys, f"says {layers + 2} layers", f"hold {layers}")
    assert main(["plan", str(copy / "config.json")]) == 0  # a config alone: planned as is


def _dead_pid() -> int:
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_staging_of_a_killed_conversion_is_removed(qwen2_src, tmp_path):
    from offload_engine.cli import main

    dead = tmp_path / f".out.partial-{_dead_pid()}"
    (dead / "model-00001.safetensors").parent.mkdir()
    (dead / "model-00001.safetensors").write_bytes(b"half a shard")
    live = tmp_path / ".out.partial-1"  # pid 1 is alive: a conversion still running
    live.mkdir()
    other = tmp_path / ".other.partial-999999999"  # another DST's: not ours to judge
    other.mkdir()
    assert main(["quantize", str(qwen2_src), str(tmp_path / "out"), "--method", "rtn",
                 "--no-progress"]) == 0
    assert not dead.exists() and live.is_dir() and other.is_dir()
    assert (tmp_path / "out" / "offload_manifest.json").is_file()


def test_force_onto_a_symlink_replaces_its_target(qwen2_src, qwen2_q, tmp_path):
    from offload_engine.cli import main

    target = tmp_path / "v1"
    shutil.copytree(qwen2_q, target)
    link = tmp_path / "current"
    link.symlink_to(target)
    before = (target / "offload_manifest.json").stat().st_ino
    assert main(["quantize", str(qwen2_src), str(link), "--force", "--method", "rtn",
                 "--no-progress"]) == 0
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert (target / "offload_manifest.json").stat().st_ino != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "v1"]


@pytest.fixture
def no_conversion(monkeypatch):
    """Fail the test if the conversion starts reading the source."""
    from offload_engine.checkpoint import convert

    def refuse(*args, **kwargs):
        raise AssertionError("the source was opened before DST was checked")

    monkeypatch.setattr(convert, "open_source", refuse)


@pytest.mark.parametrize("case", ["dangling symlink", "file as parent"])
def test_unusable_dst_is_refused_before_any_work(qwen2_src, tmp_path, capsys, no_conversion,
                                                 case):
    from offload_engine.cli import main

    if case == "dangling symlink":
        dst = tmp_path / "link"
        dst.symlink_to(tmp_path / "nowhere")
        needles = ["is a symlink to", "does not exist"]
    else:
        (tmp_path / "a-file").write_text("x")
        dst = tmp_path / "a-file" / "out"
        needles = ["a-file is a file", "pick another DST"]
    assert main(["quantize", str(qwen2_src), str(dst), "--no-progress"]) == 2
    _one_line_error(capsys, *needles)
