"""Host memory for weights (runtime/pinned.py): one exact-size buffer, page-locked in place.

The registration itself needs CUDA (tests/test_cuda.py checks the store is pinned there);
here a stand-in for torch.cuda.cudart() checks what is asked of the runtime, and the
carving and the store's layout run for real.
"""

import logging

import pytest
import torch

from offload_engine.runtime import pinned
from offload_engine.runtime.pinned import ALIGN_BYTES, HostArena, arena_nbytes
from offload_engine.runtime.store import HostStore


class FakeCudart:
    """Records cudaHostRegister/Unregister calls; fails registration when asked to."""

    class cudaError:  # noqa: N801 - the binding's spelling
        success = 0

    def __init__(self, fail: bool = False):
        self.fail = fail
        self.registered = []
        self.unregistered = []

    def cudaHostRegister(self, ptr, size, flags):  # noqa: N802
        self.registered.append((ptr, size, flags))
        return 2 if self.fail else 0

    def cudaHostUnregister(self, ptr):  # noqa: N802
        self.unregistered.append(ptr)
        return 0

    def cudaGetErrorString(self, error):  # noqa: N802
        return "out of memory"


@pytest.fixture
def fake_cudart(monkeypatch):
    def install(fail=False):
        cudart = FakeCudart(fail)
        monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)
        return cudart
    return install


def test_pieces_are_aligned_views_of_one_buffer():
    shapes = [((3, 5), torch.uint8), ((7,), torch.float16), ((2, 3), torch.int32)]
    arena = HostArena(arena_nbytes(shapes), pin=False)
    assert arena.nbytes == 3 * ALIGN_BYTES and not arena.pinned
    pieces = [arena.take(shape, dtype) for shape, dtype in shapes]
    base = arena.buffer.data_ptr()
    for piece, (shape, dtype) in zip(pieces, shapes, strict=True):
        assert piece.shape == shape and piece.dtype == dtype and piece.is_contiguous()
        assert (piece.data_ptr() - base) % ALIGN_BYTES == 0
    pieces[1].copy_(torch.arange(7, dtype=torch.float16))  # writes land in the buffer
    assert torch.equal(arena.buffer[ALIGN_BYTES:ALIGN_BYTES + 14].view(torch.float16),
                       torch.arange(7, dtype=torch.float16))
    with pytest.raises(MemoryError, match="full"):
        arena.take((1,), torch.uint8)


def test_pinning_registers_the_exact_bytes_once_and_unregisters_on_release(fake_cudart):
    cudart = fake_cudart()
    nbytes = 70_778_880  # a 32B MLP matrix at int4: torch's allocator would pin 128 MiB
    arena = HostArena(nbytes, pin=True)
    assert arena.pinned
    assert cudart.registered == [(arena.buffer.data_ptr(), nbytes, pinned.PORTABLE)]
    arena.release()
    arena.release()  # once only
    assert cudart.unregistered == [arena.buffer.data_ptr()]


def test_a_failed_registration_warns_and_leaves_ordinary_memory(fake_cudart, caplog):
    fake_cudart(fail=True)
    with caplog.at_level(logging.WARNING, logger="offload_engine.runtime.pinned"):
        arena = HostArena(1 << 20, pin=True)
    assert not arena.pinned
    assert "could not page-lock 1.00 MiB" in caplog.text and "out of memory" in caplog.text
    arena.release()  # nothing to undo


def test_the_store_holds_every_weight_in_one_exact_buffer(qwen2_q, fake_cudart):
    cudart = fake_cudart()
    store = HostStore.load(qwen2_q, pin=True, progress=False)
    assert store.pinned
    (ptr, size, _), = cudart.registered
    parts = [t for name in store for t in store[name].components().values()]
    assert all(ptr <= t.data_ptr() and t.data_ptr() + t.nbytes <= ptr + size for t in parts)
    assert size == sum(-(-t.nbytes // ALIGN_BYTES) * ALIGN_BYTES for t in parts)
    unpinned = HostStore.load(qwen2_q, pin=False, progress=False)
    for name in store:  # the same values either way
        for part, tensor in store[name].components().items():
            assert torch.equal(tensor, unpinned[name].components()[part])
    store.close()
    assert cudart.unregistered == [ptr]


def test_the_disk_tier_pins_its_kept_weights_and_its_ring_exactly(qwen2_q, fake_cudart):
    from offload_engine.checkpoint.format import verify_directory
    from offload_engine.planning.host_policy import plan_host
    from offload_engine.runtime.tiered_store import TieredStore, quantized_layouts

    cudart = fake_cudart()
    manifest = verify_directory(qwen2_q)
    layouts = quantized_layouts(manifest)
    entries = [(name, weight.nbytes) for name, weight in layouts.items()]
    everything = plan_host(entries, [], 1 << 40)
    halfway = (everything.minimum_budget + everything.ram_bytes) // 2
    bounded = plan_host(entries, [], halfway)
    assert bounded.in_ram and bounded.on_disk
    store = TieredStore.load_tiered(qwen2_q, manifest, bounded, pin=True, progress=False)
    try:
        assert store.pinned and len(cudart.registered) == 2  # kept weights, then the ring
        kept_bytes = sum(-(-t.nbytes // ALIGN_BYTES) * ALIGN_BYTES for name in bounded.in_ram
                         for t in store[name].components().values())
        assert cudart.registered[0][1] == kept_bytes
        assert cudart.registered[1][1] == sum(b.data.nbytes for b in store.ring.buffers)
    finally:
        store.close()
    assert sorted(cudart.unregistered) == sorted(ptr for ptr, _, _ in cudart.registered)


def test_pinned_bytes_tool_gives_the_readme_figures(capsys):
    from tests.test_tools import _tool

    assert _tool("pinned_bytes").main(["qwen2.5-32b"]) == 0
    out = capsys.readouterr().out
    assert "quantized weights 16.74 GB" in out
    assert "pin_memory() per tensor: 30.35 GB (1.81x)" in out
    assert "engine (one buffer): 16.74 GB (1.0000x)" in out
