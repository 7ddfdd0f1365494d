"""Binding the port: light (sockets only), so `serve` binds before it imports torch and
the model's libraries; a client that connects meanwhile waits in the listen queue."""

from __future__ import annotations

import errno
import socket

from ..errors import ConfigError

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
