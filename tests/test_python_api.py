"""The Python API as the README shows it: load() on what users hold, streaming, and the
README's Python block itself."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_python_blocks() -> list:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_stream_yields_the_pieces_of_the_same_reply(qwen2_q):
    from offload_engine import load

    with load(qwen2_q, progress=False, device="cpu") as engine:
        whole = engine.generate("the", greedy=True, max_new_tokens=8)
        stream = engine.generate("the", greedy=True, max_new_tokens=8, stream=True)
        pieces = list(stream)
        assert len(pieces) > 1 and "".join(pieces) == whole.text
        assert stream.result.token_ids == whole.token_ids
        with pytest.raises(RuntimeError, match="read already"):
            list(stream)
        early = engine.generate("the", greedy=True, max_new_tokens=64, stream=True)
        for _piece in early:
            break  # leaving the loop stops the generation at its next token
        assert early.result is not None and len(early.result.token_ids) < 64
        with pytest.raises(Exception, match="max-new-tokens"):
            list(engine.generate("the", max_new_tokens=0, stream=True))


def test_load_expands_the_home_directory(qwen2_q, monkeypatch):
    from offload_engine import load

    monkeypatch.setenv("HOME", str(qwen2_q.parent))
    with load(f"~/{qwen2_q.name}", progress=False, device="cpu") as engine:
        assert engine.generate("the", greedy=True, max_new_tokens=2).token_ids


def test_readme_python_block_names_the_folder_the_demo_writes(monkeypatch):
    from offload_engine.checkpoint.embedded import converted_demo_dir

    monkeypatch.delenv("OFFLOAD_ENGINE_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    (block,) = [b for b in _readme_python_blocks() if "offload_engine.load(" in b][:1]
    (named,) = re.findall(r'load\("([^"]+)"', block)
    assert Path(named).expanduser() == converted_demo_dir()


@pytest.mark.slow
def test_readme_python_block_runs_as_written(tmp_path, monkeypatch):
    """After `make demo` (done here, in a scratch home, when the demo model is not
    converted yet)."""
    from offload_engine.checkpoint.embedded import embedded_gguf, ensure_demo_model
    from offload_engine.errors import SourceError

    try:
        embedded_gguf()  # the package is installed --no-deps: found, not imported
    except SourceError as exc:
        pytest.skip(str(exc))
    block = next(b for b in _readme_python_blocks() if "offload_engine.load(" in b)
    monkeypatch.delenv("OFFLOAD_ENGINE_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    if not Path(re.findall(r'load\("([^"]+)"', block)[0]).expanduser().is_dir():
        monkeypatch.setenv("HOME", str(tmp_path))
        ensure_demo_model(progress=False)
    env = dict(os.environ)
    result = subprocess.run([sys.executable, "-c", block], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "tok/s" in result.stdout and result.stdout.strip()
