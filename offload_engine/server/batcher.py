"""Continuous batching: one scheduler thread owns the engine and decodes every request together.

Each step the thread (1) drops cancelled requests, (2) admits waiting requests up to
``max_batch``, prefilling them together in ONE forward (server/prefill.py) and sampling each
one's first token, then (3) runs ONE forward over all active rows and samples one token per
row. Requests join and leave between steps.
The engine is not thread-safe, so nothing else touches it while the scheduler runs.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from typing import Callable, List, Optional, Set

import torch

from ..errors import OffloadError
from ..model.cache_arg import cache_kwargs, output_cache
from . import speculative_step
from .kv_capacity import KVCapacity
from .kvbatch import BatchedCache, check_batchable
from .metrics import Metrics
from .prefill import group_size, padded_inputs
from .sampling import TextTracker, describe_logprobs, token_logprobs
from .sequence import DoneEvent, ErrorEvent, Sequence, TextEvent

__all__ = ["DoneEvent", "ErrorEvent", "QueueFullError", "Scheduler", "Sequence", "TextEvent"]

logger = logging.getLogger(__name__)


class QueueFullError(OffloadError):
    """Too many requests are waiting for a batch slot; the client should retry later."""


class Scheduler:
    """The background thread that owns the engine and batches requests."""

    def __init__(self, engine, max_batch: int = 8, max_queue: int = 64,
                 tokenizer_lock: Optional[threading.Lock] = None,
                 max_prefill_tokens: int = 8192):
        check_batchable(engine.model.config)
        speculative_step.check_server_speculation(engine.config)
        self.engine = engine
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens  # rows x longest prompt per prefill
        self.tokenizer_lock = tokenizer_lock or threading.Lock()
        self.metrics = Metrics()
        # --compile: fixed slots stepped by a compiled graph (server/slot_batch.py)
        self._batch, self.kv_capacity = _new_batch(engine, max_batch)
        self._eos_ids = _eos_ids(engine)
        self._wake = threading.Condition()
        self._waiting: collections.deque = collections.deque()  # guarded by _wake
        self._jobs: list = []  # (fn, Future) to run on the engine between steps; by _wake
        self._active: List[Sequence] = []  # scheduler thread only; row i of _batch
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self.metrics.snapshot_engine(engine.stats)
        self.metrics.set_compile_seconds(getattr(self._batch, "compile_seconds", None))

    # ----- called from the HTTP side -------------------------------------------------------
    def submit(self, sequence: Sequence) -> None:
        with self._wake:
            if self._stopping:
                raise QueueFullError("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                self.metrics.count("requests_rejected")
                raise QueueFullError(f"{len(self._waiting)} requests are already waiting "
                                     f"(--max-queue {self.max_queue}); retry shortly")
            self._waiting.append(sequence)
            self.metrics.set_queue(len(self._waiting), len(self._active))
            self._wake.notify()

    def cancel(self, sequence: Sequence) -> None:
        """Drop a request at the next step (its client disconnected)."""
        with self._wake:
            sequence.cancelled = True
            self._wake.notify()

    def run_exclusive(self, fn: Callable[[], object]) -> concurrent.futures.Future:
        """Run ``fn()`` on the scheduler thread between two steps (the engine is not
        thread-safe): for work that is not a generation, such as embeddings."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._wake:
            if self._stopping:
                raise QueueFullError("the server is shutting down")
            self._jobs.append((fn, future))
            self._wake.notify()
        return future

    def abort(self, reason: str) -> None:
        """Take no more work and fail every queued or running request now, with a 503.

        For shutdown: the requests get their answer at once, from the caller's thread,
        whatever step the scheduler thread is in; it drops them and exits after that step.
        """
        with self._wake:
            self._stopping = True
            doomed = list(self._waiting) + list(self._active)
            for sequence in doomed:
                sequence.cancelled = True
            jobs, self._jobs = self._jobs, []
            self._wake.notify()
        _fail_jobs(jobs, reason)
        for sequence in doomed:
            _safe_emit(sequence, ErrorEvent(reason, status=503))

    @property
    def eos_ids(self) -> Set[int]:
        """Tokens that end a reply (the model's and the tokenizer's end-of-sequence)."""
        return set(self._eos_ids)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="offload-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the thread after its current step; fail whatever is still queued or running."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.error("the scheduler thread did not stop within %.0f s", timeout)
                return
        with self._wake:
            leftover = list(self._waiting) + self._active
            self._waiting.clear()
            jobs, self._jobs = self._jobs, []
        _fail_jobs(jobs, "the server is shutting down")
        self._active = []
        for sequence in leftover:
            if not sequence.cancelled:  # abort() or its client already ended it
                _safe_emit(sequence, ErrorEvent("the server is shutting down", status=503))

    # ----- the scheduler thread ------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._stopping or self._waiting or self._active or self._jobs):
                    self._wake.wait()
                if self._stopping:
                    return
                jobs, self._jobs = self._jobs, []
            _run_jobs(jobs)
            try:
                self.step()
            except Exception as exc:  # noqa: BLE001 - the running requests fail with the cause
                logger.exception("scheduler step failed")
                self._fail_active(f"{type(exc).__name__}: {exc}")
                with self._wake:
                    self.metrics.set_queue(len(self._waiting), len(self._active))

    def _fail_active(self, cause: str) -> None:
        self._fail(self._active, cause)
        self._active = []
        self._batch.keep([])

    @torch.inference_mode()
    def step(self) -> None:
        """One scheduling step: drop, admit (prefill), then one decode forward for all rows."""
        started = time.perf_counter()
        self._drop_cancelled()
        admitted, refused = self._take_waiting()
        for sequence in refused:
            self.metrics.count("requests_failed")
            _safe_emit(sequence, ErrorEvent(self.kv_capacity.refusal(
                len(sequence.prompt_ids), sequence.params.max_tokens), status=400))
        if admitted:
            self._prefill(admitted)
        if self._active:
            self._decode()
        self.metrics.add_busy(time.perf_counter() - started)
        self.metrics.snapshot_engine(self.engine.stats)
        self.metrics.set_compile_seconds(getattr(self._batch, "compile_seconds", None))
        with self._wake:
            self.metrics.set_queue(len(self._waiting), len(self._active))

    def _take_waiting(self) -> tuple:
        """(sequences to prefill now, sequences refused because they never fit --kv-budget).

        Those prefilled now fit beside the running rows under --kv-budget and, padded to the
        longest, within --max-prefill-tokens; the rest keep their place in the queue."""
        with self._wake:
            live = [s for s in self._waiting if not s.cancelled]
            for sequence in self._waiting:
                if sequence.cancelled:
                    self.metrics.count("requests_cancelled")
            room = self._kv_room(live[:max(self.max_batch - len(self._active), 0)])
            room = group_size([len(s.prompt_ids) for s in live[:room]], self.max_prefill_tokens)
            refused = live[:1] if room == 0 and live and not self._active else []
            self._waiting = collections.deque(live[room + len(refused):])
        return live[:room], refused

    def _kv_room(self, candidates: List[Sequence]) -> int:
        """How many of ``candidates`` fit beside the active rows under --kv-budget; the
        others wait in the queue until rows leave (server/kv_capacity.py)."""
        width = self._batch.width
        running = [(0, s.params.max_tokens - len(s.token_ids)) for s in self._active]
        return self.kv_capacity.admit(width, running, [(len(s.prompt_ids), s.params.max_tokens)
                                                       for s in candidates])

    def _drop_cancelled(self) -> None:
        gone = {i for i, s in enumerate(self._active) if s.cancelled}
        if gone:
            self.metrics.count("requests_cancelled", len(gone))
            self._leave(gone)

    def _leave(self, rows: Set[int]) -> None:
        keep = [i for i in range(len(self._active)) if i not in rows]
        self._active = [self._active[i] for i in keep]
        self._batch.keep(keep)

    def _prefill(self, group: List[Sequence]) -> None:
        """Prefill ``group`` in one forward, sample each first token, join those not done."""
        group = [sequence for sequence in group if self._ready(sequence)]
        if not group:
            return
        try:
            inputs = padded_inputs([s.prompt_ids for s in group], self.engine.device)
            # new_kv_cache: None (dense) or the --kv-cache int8/k8v4/int4 cache for the rows
            model = self.engine.model
            output = model(**inputs, **cache_kwargs(model, self.engine.new_kv_cache(len(group))))
        except Exception as exc:  # noqa: BLE001 - every request in it fails with the cause
            logger.exception("prefill of %d request(s) failed", len(group))
            self._fail(group, f"prefill failed: {type(exc).__name__}: {exc}")
            return
        self.metrics.count("prefill_passes")
        self.metrics.count("prefills", len(group))
        going_on = [row for row, sequence in enumerate(group)
                    if self._first_token(sequence, output.logits[row, -1])]
        if going_on:
            self._join(group, going_on, output_cache(output), inputs["attention_mask"])

    def _ready(self, sequence: Sequence) -> bool:
        """Give ``sequence`` its sampler and text tracker; a failure fails it alone."""
        try:
            sequence.sampler = sequence.params.sampler(sequence.prompt_ids, self.engine.device)
            sequence.tracker = TextTracker(self.engine.tokenizer, sequence.params.stop)
        except Exception as exc:  # noqa: BLE001 - reported to the request, logged, not swallowed
            logger.exception("preparing request %d failed", sequence.id)
            self._fail([sequence], f"preparing the request failed: {type(exc).__name__}: {exc}")
            return False
        return True

    def _first_token(self, sequence: Sequence, logits: torch.Tensor) -> bool:
        """Sample the first token; True when the request goes on to decode."""
        try:
            return not self._advance(sequence, logits)
        except Exception as exc:  # noqa: BLE001 - reported to the request, logged, not swallowed
            logger.exception("first token of request %d failed", sequence.id)
            self._fail([sequence], f"prefill failed: {type(exc).__name__}: {exc}")
            return False

    def _join(self, group: List[Sequence], rows: List[int], cache, mask: torch.Tensor) -> None:
        """Add ``rows`` of the prefilled ``group`` to the running batch."""
        try:  # rows that finished at once leave; the others' padding is trimmed
            self._batch.join_prefilled(cache, mask, rows, [
                len(group[row].prompt_ids) + group[row].params.max_tokens for row in rows])
        except Exception as exc:  # noqa: BLE001 - a half-joined cache serves no row
            logger.exception("joining %d prefilled request(s) to the batch failed", len(rows))
            self._fail([group[row] for row in rows], f"prefill failed: {type(exc).__name__}: "
                                                     f"{exc}")
            self._fail_active(f"joining new requests failed: {type(exc).__name__}: {exc}")
            return
        self._active.extend(group[row] for row in rows)

    def _fail(self, sequences: List[Sequence], cause: str) -> None:
        self.metrics.count("requests_failed", len(sequences))
        for sequence in sequences:
            _safe_emit(sequence, ErrorEvent(cause))

    def _decode(self) -> None:
        if speculative_step.applies(self):  # a lone sequence under --speculate lookup
            speculative_step.lookup_step(self)
            return
        try:
            logits = self._batch.step([s.token_ids[-1] for s in self._active],
                                      self.engine.model)  # (B, V)
        except Exception as exc:  # noqa: BLE001 - every row's request fails with the cause
            logger.exception("decode step over %d sequences failed", len(self._active))
            self._fail_active(f"decode step failed: {type(exc).__name__}: {exc}")
            return
        self.metrics.record_batch(len(self._active))
        finished = {i for i, s in enumerate(self._active) if self._advance(s, logits[i])}
        if finished:
            self._leave(finished)

    def _advance(self, sequence: Sequence, logits: torch.Tensor) -> bool:
        """Sample one token for ``sequence``, hand out its text; True when it is finished."""
        params = sequence.params
        allowed = logits if sequence.constraint is None else sequence.constraint.mask(logits)
        token = sequence.sampler.choose(sequence.sampler.scores(allowed, sequence.token_ids))
        if params.logprobs is not None:
            sequence.logprobs.append((token, *token_logprobs(logits, token, params.logprobs)))
        sequence.token_ids.append(token)
        self.metrics.count("tokens_generated")
        reason = None
        if sequence.constraint is not None:
            sequence.constraint.accept(token)
        if token in self._eos_ids or (sequence.constraint and sequence.constraint.finished):
            reason = "stop"
        elif len(sequence.token_ids) >= params.max_tokens:
            reason = "length"
        with self.tokenizer_lock:
            text, stopped = sequence.tracker.update(sequence.token_ids, final=reason is not None)
            reported = describe_logprobs(self.engine.tokenizer, sequence.logprobs) \
                if text or stopped or reason else []
        if stopped:
            reason = "stop"
        if reported:
            sequence.logprobs = []
        if text and not _safe_emit(sequence, TextEvent(text, reported)):
            sequence.cancelled = True
        if reason is None:
            return False
        self.metrics.count("requests_served")
        _safe_emit(sequence, DoneEvent(reason, len(sequence.prompt_ids),
                                       len(sequence.token_ids), [] if text else reported))
        return True


def _new_batch(engine, max_batch: int) -> tuple:
    """(the batch, its --kv-budget check): eager, or --compile's fixed slots."""
    budget = engine.config.kv_budget_bytes()
    if not engine.config.compile:
        return BatchedCache(), KVCapacity(engine.kv_layout, budget)
    from .slot_batch import SlotBatch, SlotCapacity

    context = getattr(engine.model.config, "max_position_embeddings", None)
    capacity = SlotCapacity(engine.kv_layout, budget, max_batch, context)
    return SlotBatch(engine, max_batch, capacity.slot_tokens), capacity


def _run_jobs(jobs: list) -> None:
    for fn, future in jobs:
        if not future.set_running_or_notify_cancel():
            continue
        try:
            with torch.inference_mode():
                future.set_result(fn())
        except Exception as exc:  # noqa: BLE001 - handed to the caller, who reports it
            future.set_exception(exc)


def _fail_jobs(jobs: list, reason: str) -> None:
    for _fn, future in jobs:
        if future.set_running_or_notify_cancel():
            future.set_exception(QueueFullError(reason))


def _safe_emit(sequence: Sequence, event) -> bool:
    """Hand an event to the request; False when its side is gone (loop closed)."""
    try:
        sequence.emit(event)
        return True
    except RuntimeError:
        logger.debug("request %d: its event loop is gone; dropping it", sequence.id)
        return False


def _eos_ids(engine) -> Set[int]:
    ids = set()
    for source in (engine.model.generation_config.eos_token_id,
                   engine.tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(int(i) for i in source)
    return ids
