"""Running the app: bind the port, serve /health ("loading") while the model loads, serve,
and stop promptly on Ctrl-C.

uvicorn's own shutdown waits for every open request to finish before the app's shutdown
runs; ours would decode each to its end (minutes on a big model). So the server here fails
every queued and running request with a 503 as soon as shutdown begins, and a second
Ctrl-C does not force an exit that would tear down tasks mid-flight with tracebacks.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import socket
import threading
import time
from typing import Callable, Optional

import uvicorn

from .app import SHUTDOWN_MESSAGE, ServerConfig, create_app
from .listen import bind_socket

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


class EngineServer(uvicorn.Server):
    """uvicorn's server, failing in-flight requests first when it is asked to stop.

    ``stopper`` has ``abort(reason)``: the Scheduler, or the app's ServedModel."""

    def __init__(self, config: uvicorn.Config, stopper):
        super().__init__(config)
        self.stopper = stopper

    async def shutdown(self, sockets=None) -> None:
        # the requests now get a 503 and finish at once, so uvicorn's wait for open
        # connections ends in milliseconds instead of after every reply is decoded
        self.stopper.abort(SHUTDOWN_MESSAGE)
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
                                   app.state.served)
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


def serve(model, engine_config, config: ServerConfig,
          on_loaded: Optional[Callable[[str, str], None]] = None,
          on_listening: Optional[Callable[[str], None]] = None,
          sock: Optional[socket.socket] = None) -> None:
    """Listen first, load ``model`` meanwhile, serve until interrupted, then stop the
    scheduler and the engine.

    While the model loads, /health answers 503 {"status": "loading"} and the model routes
    503 with code model_loading, instead of refused connections. ``on_listening`` receives
    the base URL once the port is bound; ``on_loaded`` the served model id and the API's
    URL once the engine is loaded. A load that fails stops the server and is raised here.
    ``sock``: already bound by ``listen.bind_socket`` (the CLI binds before it imports
    torch, so early clients wait instead of being refused); closed here either way.
    """
    from ..decode.api import load

    warn_if_exposed(config)
    sock = sock or bind_socket(config.host, config.port)
    host, port = sock.getsockname()[:2]
    url = f"http://{_url_host(host)}:{port}"
    try:
        app = create_app(None, config)
        served = app.state.served
        server = EngineServer(uvicorn.Config(app, log_level="info",
                                             timeout_graceful_shutdown=config.shutdown_grace_s),
                              served)

        def loaded(service) -> None:
            app.state.service = service
            if on_loaded is not None:
                on_loaded(service.model_id, f"{url}/v1")

        def failed(_exc: BaseException) -> None:
            server.should_exit = True  # serve() raises it once uvicorn has stopped

        if on_listening is not None:
            on_listening(url)
        served.load(lambda: load(model, engine_config), loaded, failed)
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled; we are done
            pass
        _close(served)
    finally:
        sock.close()


def _close(served) -> None:
    """After uvicorn stopped: stop the scheduler, then close the engine; raise a failed
    load's error. An engine still loading is closed by its loader when it finishes."""
    served.abort(SHUTDOWN_MESSAGE)
    service = served.service_or_none
    if service is not None:
        # a forced exit skips the app's shutdown: stop the scheduler before the engine
        service.scheduler.stop()
        service.engine.close()
    if served.error is not None:
        raise served.error


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host

