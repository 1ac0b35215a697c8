"""Socket set-up shared by the threaded and the asyncio layers."""

from __future__ import annotations

import errno
import socket

__all__ = ["listen"]


def listen(addr: str, port: int, backlog: int) -> socket.socket:
    """Bind and listen on ``addr:port`` (IPv4 or IPv6), restart-friendly."""
    infos = socket.getaddrinfo(addr or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        if hasattr(socket, "SO_REUSEADDR") and not hasattr(socket, "SO_EXCLUSIVEADDRUSE"):
            # Lets a restarted host bind while old connections sit in TIME_WAIT; on
            # POSIX this never lets two live hosts share a port.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        reason = (
            "the port is in use by another program"
            if exc.errno == errno.EADDRINUSE
            else (exc.strerror or str(exc))
        )
        raise OSError(exc.errno, f"cannot listen on {addr}:{port}: {reason}") from exc
    sock.setblocking(False)
    return sock
