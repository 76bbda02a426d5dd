"""Serving the API: uvicorn in a thread of `machaon serve`, or alone as `machaon api`."""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from typing import TYPE_CHECKING

import uvicorn
from fastapi import FastAPI

from ..config import Settings

if TYPE_CHECKING:
    from ..startup import Waiting

log = logging.getLogger("machaon.api")

# How long start() waits for uvicorn to serve, and stop() for requests in flight.
START_TIMEOUT_S = 10
STOP_GRACE_S = 5


class ApiServer:
    """uvicorn serving `app` on api.host:api.port from a daemon thread."""

    def __init__(self, settings: Settings, app: FastAPI):
        self.settings = settings
        api = settings.api
        # uvicorn's own logging stays off: its access log would add a line per request to a
        # service log that summarises, and its start-up lines repeat ours.
        self.server = uvicorn.Server(uvicorn.Config(
            app, host=api.host, port=api.port, log_config=None, access_log=False,
            timeout_graceful_shutdown=STOP_GRACE_S))
        if not log.isEnabledFor(logging.DEBUG):
            logging.getLogger("uvicorn").setLevel(logging.WARNING)
        self.socket: socket.socket | None = None
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = self.settings.api.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.settings.api.port}"

    def bind(self, waiting: Waiting | None = None) -> None:
        """Take the port now, so that a port in use stops start-up before anything is accepted; one
        held by a process on its way out is waited for (until `waiting`'s deadline: service.startup_wait
        after start-up began)."""
        from ..startup import until_available
        if self.socket is None:
            until_available(self.settings, self._bind, waiting)

    def _bind(self) -> None:
        api = self.settings.api
        where = f"{api.host}:{api.port}"
        try:
            family, kind, proto, _, address = socket.getaddrinfo(
                api.host, api.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
            sock = socket.socket(family, kind, proto)
        except OSError as exc:
            raise self._bind_error(exc, where) from None
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            sock.bind(address)
            sock.listen(128)
        except OSError as exc:
            sock.close()
            raise self._bind_error(exc, where) from None
        self.socket = sock

    def _bind_error(self, exc: OSError, where: str):
        if exc.errno == errno.EADDRINUSE:
            return self.settings.unavailable("api.port", f"{where} is already in use by another program "
                                             "(choose another api.port, or api.enabled = false)")
        if exc.errno in (errno.EACCES, errno.EPERM):
            return self.settings.error("api.port", f"not allowed to listen on {where} "
                                       "(ports below 1024 need CAP_NET_BIND_SERVICE)")
        return self.settings.error("api.host", f"cannot listen on {where}: {exc.strerror or exc}")

    def start(self) -> None:
        """Serve from a daemon thread; returns once requests are answered."""
        self.bind()
        assert self.socket is not None
        # Signals stay with the main thread: uvicorn leaves them alone outside it.
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]},
                                       name="api", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the API did not start on {self.url}; the log above says why")
            time.sleep(0.02)
        log.info("API and web page on %s/ (REST under /api/v1, described at /api/docs)", self.url)

    def stop(self) -> None:
        """Stop accepting, let requests in flight finish (up to STOP_GRACE_S), then close."""
        if self.thread is not None:
            self.server.should_exit = True
            self.thread.join(STOP_GRACE_S + 5)
            if self.thread.is_alive():
                log.warning("the API did not stop within %d s", STOP_GRACE_S + 5)
            self.thread = None
        if self.socket is not None:
            self.socket.close()
            self.socket = None


def serve_api(settings: Settings) -> None:
    """`machaon api`: the API and web page alone, beside a `machaon serve` that shares the job store
    (and the spool, for /readyz), until SIGTERM or Ctrl-C. Jobs it queues are taken by that
    service's workers at their next look."""
    from ..serve import until_stopped
    from ..startup import open_store
    from .app import Hooks, create_app

    store = open_store(settings, wait=True)
    try:
        server = ApiServer(settings, create_app(settings, store, Hooks()))
        server.start()

        def run(stopping: threading.Event, _hurry: threading.Event) -> None:
            while not stopping.wait(1):
                pass
            server.stop()
        until_stopped(run, f"letting requests in flight finish (up to {STOP_GRACE_S} s)")
    finally:
        store.dispose()
