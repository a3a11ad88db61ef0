"""Request logging off the request path: ``Background`` takes records from the router (a
queue put, microseconds) and hands them in batches, from its own thread, to its sinks: the
request log files (``ray_pipeline.serving.request_log``, the generate stage's log format),
the metrics and the drift statistics."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("distill.serve")


class Background:
    """A queue the request path puts records on, and a thread that hands them to `sinks`
    in batches, at least every `flush_s` seconds. A sink that fails is logged with the count
    of records it missed; the others still get them. `tick`, when given, runs in the same
    thread every `flush_s` seconds, records or not (the metrics re-report their gauges)."""

    def __init__(
        self,
        sinks: list[Callable[[list[dict[str, Any]]], Any]],
        flush_s: float,
        tick: Callable[[], Any] | None = None,
    ):
        self.sinks = sinks
        self.flush_s = flush_s
        self.tick = tick
        self.failed = 0  # records a sink could not take
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._idle = threading.Condition()
        self._pending = 0
        self._thread = threading.Thread(target=self._run, daemon=True, name="request-log")
        self._thread.start()

    def put(self, record: dict[str, Any]) -> None:
        with self._idle:
            self._pending += 1
        self._queue.put(record)

    def _drain(self) -> list[dict[str, Any]]:
        out = []
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                return out

    def _hand_over(self, records: list[dict[str, Any]]) -> None:
        for sink in self.sinks:
            try:
                sink(records)
            except Exception:  # noqa: BLE001 - a full disk must not stop serving: count, log, go on
                self.failed += len(records)
                log.exception("request log: a sink failed on %d records", len(records))
        with self._idle:
            self._pending -= len(records)
            self._idle.notify_all()

    def _run(self) -> None:
        while not self._stop.wait(self.flush_s):
            records = self._drain()
            if records:
                self._hand_over(records)
            if self.tick is not None:
                try:
                    self.tick()
                except Exception:  # noqa: BLE001 - metrics must not stop the request log
                    log.exception("request log: the periodic tick failed")
        records = self._drain()
        if records:
            self._hand_over(records)

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every record put so far was handed over (True), or `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        with self._idle:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(min(left, self.flush_s))
        return True

    def close(self, timeout_s: float = 10.0) -> None:
        """Hand over what is queued and stop the thread."""
        self._stop.set()
        self._thread.join(timeout_s)
