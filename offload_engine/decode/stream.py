"""``engine.generate(..., stream=True)``: the reply as an iterator of text pieces.

generate() runs in a worker thread and hands each finished piece (``on_text``) to a
queue the caller's loop reads. Leaving the loop early (``break``, an exception, or
``close()``) stops the generation at its next token, and the worker's own failure is
raised in the caller's loop. ``result`` holds the GenerationResult once the loop ends.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator, Optional

from .generate import GenerationResult, generate

_END = object()  # the worker is done (result or error set)


class TextStream:
    """Iterate for the text pieces; ``result`` (text, token ids, stats) afterwards."""

    def __init__(self, engine, prompt, kwargs: dict):
        if kwargs.get("on_text") is not None:
            raise TypeError("stream=True hands the text pieces to the loop; drop on_text")
        self.result: Optional[GenerationResult] = None
        self._error: Optional[BaseException] = None
        self._pieces: queue.Queue = queue.Queue()
        self._stop = kwargs.pop("stop_event", None) or threading.Event()
        self._thread = threading.Thread(
            target=self._work, args=(engine, prompt, kwargs), name="offload-stream", daemon=True)
        self._thread.start()

    def _work(self, engine, prompt, kwargs: dict) -> None:
        try:
            self.result = generate(engine, prompt, on_text=self._pieces.put,
                                   stop_event=self._stop, **kwargs)
        except BaseException as exc:  # handed to the caller's loop, raised there
            self._error = exc
        finally:
            self._pieces.put(_END)

    def __iter__(self) -> Iterator[str]:
        if not self._thread.is_alive() and self._pieces.empty():
            raise RuntimeError("this stream was read already; call generate again")
        try:
            while True:
                piece = self._pieces.get()
                if piece is _END:
                    break
                yield piece
        finally:
            self.close()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Stop the generation (if still running) and wait for the worker."""
        self._stop.set()
        self._thread.join()
