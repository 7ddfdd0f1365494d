# Triton reads TRITON_INTERPRET when a @triton.jit function is defined, so this runs before
# any test imports a kernel: without a GPU the kernels run in triton's CPU interpreter.
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# ----- shared fixtures: tiny random models, converted once per session -----------------
import pytest  # noqa: E402

from tests import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    tiny.train_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def qwen2_src(tmp_path_factory, tokenizer_dir):
    """A tiny random Qwen2 (q/k/v biases, untied lm_head) in two+ bf16 shards."""
    return tiny.make_checkpoint(tmp_path_factory.mktemp("qwen2") / "src", "qwen2",
                                tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="session")
def llama_src(tmp_path_factory, tokenizer_dir):
    """A tiny random Llama (tied embeddings, hidden 96: padded to group 64)."""
    return tiny.make_checkpoint(tmp_path_factory.mktemp("llama") / "src", "llama",
                                tokenizer_dir=tokenizer_dir)


def _converted(tmp_path_factory, src, name, scheme="int4", group_size=64):
    from offload_engine.checkpoint.convert import convert
    from offload_engine.quant.layout import QuantSpec

    dst = tmp_path_factory.mktemp(name) / "q"
    convert(src, dst, QuantSpec(scheme, group_size), progress=False)
    return dst


@pytest.fixture(scope="session")
def qwen2_q(tmp_path_factory, qwen2_src):
    return _converted(tmp_path_factory, qwen2_src, "qwen2q")


@pytest.fixture(scope="session")
def llama_q(tmp_path_factory, llama_src):
    return _converted(tmp_path_factory, llama_src, "llamaq")
