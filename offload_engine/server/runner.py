"""Running the app: bind the port first, load the model, serve, and stop promptly on Ctrl-C.

uvicorn's own shutdown waits for every open request to finish before the app's shutdown
runs; ours would decode each to its end (minutes on a big model). So the server here fails
every queued and running request with a 503 as soon as shutdown begins, and a second
Ctrl-C does not force an exit that would tear down tasks mid-flight with tracebacks.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import signal
import socket
import threading
import time
from typing import Callable, Optional

import uvicorn

from ..errors import ConfigError
from .app import SHUTDOWN_MESSAGE, ServerConfig, create_app

logger = logging.getLogger(__name__)



def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def warn_if_exposed(config: ServerConfig) -> None:
    if not config.api_key and not is_loopback(config.host):
        logger.warning("binding %s without an API key: anyone who can reach this machine can "
                       "use the model; set --api-key (or OFFLOAD_ENGINE_API_KEY), or bind "
                       "127.0.0.1", config.host)


LISTEN_BACKLOG = 2048  # uvicorn's default


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind (host, port) now, so a taken port fails before minutes of model loading.

    The bound socket is handed to uvicorn, so nothing can take the port in between.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    # as uvicorn does: a previous server's connections in TIME_WAIT do not block the port,
    # a server still listening on it does
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        # Listening now queues a client that connects between the "serving" banner and
        # uvicorn's start, instead of refusing it (seen as ConnectionRefused under load).
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"port {port} on {host} is already in use (another server?); "
                              "stop it or pick a free one with --port") from None
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; "
                          "check --host and --port") from None
    return sock


class EngineServer(uvicorn.Server):
    """uvicorn's server, failing in-flight requests first when it is asked to stop."""

    def __init__(self, config: uvicorn.Config, scheduler):
        super().__init__(config)
        self.scheduler = scheduler

    async def shutdown(self, sockets=None) -> None:
        # the requests now get a 503 and finish at once, so uvicorn's wait for open
        # connections ends in milliseconds instead of after every reply is decoded
        self.scheduler.abort(SHUTDOWN_MESSAGE)
        await super().shutdown(sockets)

    def handle_exit(self, sig, frame) -> None:
        if self.should_exit and sig == signal.SIGINT:
            # uvicorn would force-exit: skip the app's shutdown and cancel tasks mid-flight,
            # printing tracebacks. Ours is already quick (one scheduler step at most).
            logger.warning("already stopping; waiting for the current decode step to end")
            return
        super().handle_exit(sig, frame)


class BackgroundServer:
    """The app served on a free loopback port from a thread, for tools: ``with`` it, use
    ``.url``, and it stops (in-flight requests fail with 503) when the block ends."""

    def __init__(self, app, timeout_s: float = 60.0):
        self.app, self.timeout_s = app, timeout_s
        self.socket = bind_socket("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.server = EngineServer(uvicorn.Config(app, log_level="warning"),
                                   app.state.service.scheduler)
        self.thread = threading.Thread(target=self.server.run,
                                       kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + self.timeout_s
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.should_exit = True
        self.thread.join(self.timeout_s)
        self.socket.close()


def run_app(app, sock: socket.socket, grace_s: float) -> None:
    """Serve ``app`` on the bound ``sock`` until a signal (or should_exit) stops it."""
    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=grace_s)
    server = EngineServer(config, app.state.service.scheduler)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled; we are done anyway
        pass


def serve(model, engine_config, config: ServerConfig,
          on_loaded: Optional[Callable[[str, str], None]] = None) -> None:
    """Load ``model``, serve it until interrupted, then stop the scheduler and the engine.

    ``on_loaded`` receives the served model id and the base URL once the engine is loaded.
    """
    from ..decode.api import load

    if engine_config.compile:
        raise ConfigError("serve --compile: the server's continuous batcher changes the batch "
                          "and the KV cache's shape every step, so its step cannot be one "
                          "compiled graph yet; drop --compile (run, chat, bench and "
                          "offload_engine.load take it)")
    warn_if_exposed(config)
    sock = bind_socket(config.host, config.port)
    try:
        with load(model, engine_config) as engine:
            app = create_app(engine, config)
            if on_loaded is not None:
                host, port = sock.getsockname()[:2]
                on_loaded(app.state.service.model_id, f"http://{_url_host(host)}:{port}/v1")
            run_app(app, sock, config.shutdown_grace_s)
            # a forced exit skips the app's shutdown: stop the scheduler before the engine
            app.state.service.scheduler.stop()
    finally:
        sock.close()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host

