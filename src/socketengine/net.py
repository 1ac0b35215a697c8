"""Socket set-up shared by the threaded and the asyncio layers.

Addresses are a host name or IP (TCP, with a port) or ``"unix:///path/to.sock"``: a
Unix domain socket (like pyzmq's ``ipc://``; the port is ignored).  A Unix socket file
is created readable and writable by its owner only (mode 0600), so file permissions
are the access control: another local user cannot connect.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from typing import Optional, Tuple

__all__ = [
    "listen",
    "unix_path",
    "connect",
    "peer_address",
    "set_nodelay",
    "listening_port",
    "forget_listener",
    "UNIX_PREFIX",
]

UNIX_PREFIX = "unix://"


def unix_path(addr: str) -> Optional[str]:
    """The socket file of a ``unix://`` address, or ``None`` for a TCP address."""
    if addr.startswith(UNIX_PREFIX):
        path = addr[len(UNIX_PREFIX) :]
        if not path:
            raise ValueError("a unix:// address needs a path: 'unix:///run/app.sock'")
        return path
    return None


def _listen_unix(path: str, backlog: int) -> socket.socket:
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # a stale socket file left by a host that died
            else:
                raise OSError(
                    errno.EADDRINUSE, f"cannot listen on unix://{path}: another host is there"
                )
            finally:
                probe.close()
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the file is created 0600: this user only
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on unix://{path}: {exc.strerror}") from exc
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def connect(addr: str, port: int, timeout: Optional[float]) -> socket.socket:
    """A connected (blocking, with ``timeout``) socket to a host's ``addr:port`` or
    ``unix://`` path."""
    path = unix_path(addr)
    if path is None:
        return socket.create_connection((addr, port), timeout=timeout)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except FileNotFoundError as exc:  # the host has not made its socket yet: retry
        sock.close()
        raise ConnectionRefusedError(errno.ECONNREFUSED, f"no socket at {path}") from exc
    except BaseException:
        sock.close()
        raise
    return sock


def forget_listener(addr: str) -> None:
    """After a host stopped listening: remove its Unix socket file (nothing left)."""
    path = unix_path(addr)
    if path is not None:
        try:
            if stat.S_ISSOCK(os.stat(path).st_mode):
                os.unlink(path)
        except OSError:
            pass


def listening_port(sock: socket.socket) -> int:
    """The TCP port a listening socket got (0 for a Unix socket)."""
    name = sock.getsockname()
    return int(name[1]) if isinstance(name, tuple) else 0


def set_nodelay(sock: socket.socket) -> None:
    """TCP_NODELAY on TCP sockets (nothing to do on Unix sockets)."""
    if sock.family != getattr(socket, "AF_UNIX", None):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def peer_address(sock: socket.socket, addr: str) -> Tuple[str, int]:
    """``(host, port)`` of the peer; ``(path, 0)`` over a Unix socket."""
    if sock.family == getattr(socket, "AF_UNIX", None):
        return (unix_path(addr) or addr, 0)
    peer = sock.getpeername()
    return (peer[0], peer[1])


def listen(addr: str, port: int, backlog: int) -> socket.socket:
    """Bind and listen on ``addr:port`` (IPv4 or IPv6) or a ``unix://`` path,
    restart-friendly."""
    path = unix_path(addr)
    if path is not None:
        return _listen_unix(path, backlog)
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
