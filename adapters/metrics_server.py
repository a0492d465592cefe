"""``CHINWAG_METRICS_PORT``: ``/metrics`` (Prometheus), ``/health`` and ``/ready`` over HTTP.

The server runs on a thread of its own, not on the event loop, so that it answers while the
loop is stuck: ``/health`` then says so (503, "the event loop has not responded…") instead
of timing out, and ``/metrics`` still shows what the process was doing. ``/health`` and
``/ready`` ask ``Probes`` through the loop, with a deadline of ``LOOP_DEADLINE_S``: the
loop running the question is the proof that it responds. ``/metrics`` reads the counters
from this thread (they are thread-safe) and measures the loop's lag on the way.

Answers: ``200 {"status": "ok"}``, or ``503 {"status": "unavailable", "reason": ...}``,
as ``chinwag serve``'s ``/health`` answers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Self

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from bot.errors import ConfigError
from bot.metrics import Metrics
from bot.probes import Probes

logger = logging.getLogger(__name__)

LOOP_DEADLINE_S = 2.0
"""How long the event loop may take to answer a probe before it counts as stuck: far
beyond any sound lag (a busy loop answers within milliseconds), well within a prober's
timeout."""


class MetricsServer:
    def __init__(self, metrics: Metrics, probes: Probes, *, host: str, port: int) -> None:
        self._metrics = metrics
        self._probes = probes
        self._host = host
        self._port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    async def __aenter__(self) -> Self:
        self._loop = asyncio.get_running_loop()
        try:
            self._server = _Server((self._host, self._port), self)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {self._host}:{self._port}: "
                              f"{exc.strerror or exc}") from exc
        port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="chinwag-metrics", daemon=True)
        self._thread.start()
        host = f"[{self._host}]" if ":" in self._host else self._host
        self.url = f"http://{host}:{port}"
        logger.info("serving metrics, health and readiness at %s", self.url)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        server, self._server = self._server, None
        if server is not None:
            await asyncio.to_thread(server.shutdown)
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # The server's thread.

    def answer(self, path: str) -> tuple[int, str, bytes]:
        """Status, content type and body for a GET of ``path``."""
        if path == "/metrics":
            self._metrics.loop_lag(self._loop_lag())
            return 200, CONTENT_TYPE_LATEST, generate_latest(self._metrics.registry)
        if path == "/health":
            return _status(self._on_loop(self._probes.health))
        if path == "/ready":
            return _status(self._on_loop(self._probes.ready))
        return 404, "text/plain; charset=utf-8", b"not found: try /metrics, /health, /ready\n"

    def _on_loop(self, question: Callable[[], str | None]) -> str | None:
        """Ask on the event loop; its failure to answer in time is the answer."""
        answer: concurrent.futures.Future[str | None] = concurrent.futures.Future()

        def ask() -> None:
            if answer.set_running_or_notify_cancel():
                try:
                    answer.set_result(question())
                except Exception as exc:  # a probe that fails says so, it does not hang
                    answer.set_exception(exc)

        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(ask)
        except RuntimeError:  # the loop is closed: the process is ending
            return "the event loop is not running"
        try:
            return answer.result(timeout=LOOP_DEADLINE_S)
        except concurrent.futures.TimeoutError:
            answer.cancel()
            return f"the event loop has not responded for {LOOP_DEADLINE_S:g} s"
        except Exception as exc:
            logger.exception("a health probe failed")
            return f"the health probe failed: {type(exc).__name__}: {exc}"

    def _loop_lag(self) -> float:
        """Seconds the loop took to run a callback (``LOOP_DEADLINE_S`` at most)."""
        started = time.monotonic()
        self._on_loop(lambda: None)
        return min(time.monotonic() - started, LOOP_DEADLINE_S)


def _status(trouble: str | None) -> tuple[int, str, bytes]:
    if trouble is None:
        return 200, "application/json", json.dumps({"status": "ok"}).encode()
    body = {"status": "unavailable", "reason": trouble}
    return 503, "application/json", json.dumps(body).encode()


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # the name http.server calls
        status, content_type, body = self.server.owner.answer(self.path.split("?", 1)[0])
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        # Every scrape would be a line on standard error otherwise.
        logger.debug("metrics: " + format, *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a scrape in progress never holds up the exit

    def __init__(self, address: tuple[str, int], owner: MetricsServer) -> None:
        self.owner = owner
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def handle_error(self, request: object, client_address: object) -> None:
        # A prober that hangs up before the answer is no fault of ours (the default prints
        # a traceback to standard error).
        logger.debug("metrics: a request from %s failed", client_address, exc_info=True)
