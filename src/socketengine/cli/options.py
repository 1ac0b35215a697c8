"""Command-line options shared by several commands, and the TLS contexts they build."""

from __future__ import annotations

import argparse
import math
import os
import ssl
from typing import Any, Optional

from ..sync.client import Client
from .exits import CommandError, UsageError, one_line

__all__ = [
    "add_client_options",
    "add_global_options",
    "add_host_options",
    "add_monitor_options",
    "add_output_options",
    "add_value_options",
    "client_tls",
    "host_tls",
    "make_client",
    "monitor_tls",
    "port_number",
    "positive_int",
    "seconds",
]

# -- value types ------------------------------------------------------------------------


def port_number(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0-65535, not {port}")
    return port


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"seconds must be >= 0, not {text}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


# -- option groups ----------------------------------------------------------------------


def add_global_options(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """``-v`` and ``-q``: accepted before the command (``prefix="global_"``, added to
    the main parser) and after it; :func:`~socketengine.cli.parser.main` merges both."""
    p.add_argument(
        "-v",
        "--verbose",
        dest=prefix + "verbose",
        action="count",
        default=0,
        help="log what the library does (-vv: debug, and tracebacks on errors)",
    )
    p.add_argument(
        "-q",
        "--quiet",
        dest=prefix + "quiet",
        action="store_true",
        help="no status lines on standard error (errors only)",
    )


def add_host_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("host")
    g.add_argument(
        "--addr",
        default="127.0.0.1",
        help="address to listen on (default %(default)s: this machine only; "
        "0.0.0.0 or :: for the network, then also --token)",
    )
    g.add_argument(
        "--port", type=port_number, default=8080, help="port to listen on (default 8080; 0: any)"
    )
    g.add_argument(
        "--token",
        default=os.environ.get("SOCKETENGINE_TOKEN"),
        help="shared secret clients must prove (default: $SOCKETENGINE_TOKEN)",
    )
    g.add_argument(
        "--timeout",
        type=seconds,
        default=2.0,
        help="seconds a write to a full client and the final flush may take (default 2)",
    )
    t = p.add_argument_group("TLS (host side)")
    t.add_argument("--tls-cert", metavar="FILE", help="certificate chain (PEM): serve TLS")
    t.add_argument("--tls-key", metavar="FILE", help="its private key (if not in --tls-cert)")
    t.add_argument(
        "--tls-ca",
        metavar="FILE",
        help="also require client certificates signed by this CA (mutual TLS)",
    )


def add_client_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("connection")
    g.add_argument("--addr", default="127.0.0.1", help="the host's address (default %(default)s)")
    g.add_argument("--port", type=port_number, default=8080, help="the host's port (default 8080)")
    g.add_argument(
        "--token",
        default=os.environ.get("SOCKETENGINE_TOKEN"),
        help="the host's shared secret (default: $SOCKETENGINE_TOKEN)",
    )
    g.add_argument(
        "--name", default=None, help="this client's name, as the host sees it (default: none)"
    )
    g.add_argument(
        "--timeout",
        type=seconds,
        default=5.0,
        help="seconds to wait for the host to accept, for a write or a reply (default 5)",
    )
    t = p.add_argument_group("TLS (client side)")
    t.add_argument(
        "--tls",
        action="store_true",
        help="connect over TLS, verifying the host against the system's CAs",
    )
    t.add_argument(
        "--tls-ca",
        metavar="FILE",
        help="connect over TLS, trusting this CA or self-signed host certificate (PEM)",
    )
    t.add_argument("--tls-cert", metavar="FILE", help="client certificate (PEM), for mutual TLS")
    t.add_argument("--tls-key", metavar="FILE", help="its private key (if not in --tls-cert)")


def add_value_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("channel", metavar="CHANNEL", help="the channel name")
    p.add_argument(
        "value",
        metavar="VALUE",
        nargs="?",
        help='the value, as JSON: 42, 1.5, true, null, "text", [1, 2], {"x": 1}',
    )
    v = p.add_argument_group("value")
    v.add_argument("--raw", action="store_true", help="VALUE is a plain string, not JSON")
    v.add_argument(
        "--file",
        metavar="PATH",
        help="send this file instead of VALUE ('-': standard input): an image file "
        "(PNG, JPEG, GIF, BMP, TIFF; needs Pillow and numpy) as a numpy image, "
        "anything else as bytes",
    )
    v.add_argument("--bytes", action="store_true", help="with --file: always send bytes")


def add_output_options(p: argparse.ArgumentParser) -> None:
    o = p.add_argument_group("output")
    o.add_argument(
        "--json",
        action="store_true",
        help='one JSON object per line (bytes as {"$bytes": base64}, arrays as '
        '{"$ndarray": shape, "dtype": ..., "data": ...})',
    )
    o.add_argument(
        "--max-chars",
        type=positive_int,
        default=120,
        metavar="N",
        help="cut renderings of values to N characters (default 120)",
    )
    o.add_argument(
        "--duration", type=seconds, metavar="SECONDS", help="stop after this many seconds"
    )


def add_monitor_options(p: argparse.ArgumentParser) -> None:
    m = p.add_argument_group("monitor")
    m.add_argument(
        "--monitor-addr",
        default="127.0.0.1",
        help="address the monitor listens on (default %(default)s: this machine only)",
    )
    m.add_argument(
        "--bgr",
        action="store_true",
        help="raw image arrays are in OpenCV's BGR order: show them in true colours",
    )


# -- TLS and clients --------------------------------------------------------------------


def _load_chain(ctx: ssl.SSLContext, cert: str, key: Optional[str]) -> None:
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        what = f"--tls-cert {cert}" + (f" / --tls-key {key}" if key else "")
        raise CommandError(f"cannot load {what}: {one_line(exc)}") from exc


def _load_ca(ctx: ssl.SSLContext, cafile: str) -> None:
    try:
        ctx.load_verify_locations(cafile)
    except (OSError, ssl.SSLError) as exc:
        raise CommandError(f"cannot load --tls-ca {cafile}: {one_line(exc)}") from exc


def host_tls(args: argparse.Namespace) -> Optional[ssl.SSLContext]:
    """The host's TLS context from ``--tls-cert``/``--tls-key``/``--tls-ca``, or None."""
    if not args.tls_cert:
        if args.tls_key or args.tls_ca:
            raise UsageError("--tls-key and --tls-ca need --tls-cert (the host's certificate)")
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    _load_chain(ctx, args.tls_cert, args.tls_key)
    if args.tls_ca:
        _load_ca(ctx, args.tls_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def monitor_tls(args: argparse.Namespace) -> Optional[ssl.SSLContext]:
    """The monitor serves HTTPS with the host's certificate (browsers show none)."""
    if not args.tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    _load_chain(ctx, args.tls_cert, args.tls_key)
    return ctx


def client_tls(args: argparse.Namespace) -> Optional[ssl.SSLContext]:
    """The client's TLS context, or None without ``--tls``/``--tls-ca``/``--tls-cert``.

    The host's certificate is always verified (against ``--tls-ca`` if given, else the
    system's CAs) and must name ``--addr``; there is no option to skip that.
    """
    if not (args.tls or args.tls_ca or args.tls_cert):
        if args.tls_key:
            raise UsageError("--tls-key needs --tls-cert")
        return None
    ctx = ssl.create_default_context()
    if args.tls_ca:
        _load_ca(ctx, args.tls_ca)
    if args.tls_cert:
        _load_chain(ctx, args.tls_cert, args.tls_key)
    return ctx


def make_client(args: argparse.Namespace, reconnect: bool, open: bool = True) -> Any:
    """A :class:`~socketengine.Client` from the connection options."""
    return Client(
        args.addr,
        args.port,
        timeout=args.timeout,
        open=open,
        connect_timeout=args.timeout,
        name=args.name,
        token=args.token or None,
        tls=client_tls(args),
        reconnect=reconnect,
    )
