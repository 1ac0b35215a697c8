"""The ``socketengine`` argument parser and :func:`main`, which runs a command."""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
from typing import Any, Optional, Sequence

from .. import __version__
from ..compiled import build
from ..errors import SocketEngineError
from .commands import (
    cmd_bench,
    cmd_demo,
    cmd_host,
    cmd_hosts,
    cmd_monitor,
    cmd_request,
    cmd_send,
    cmd_watch,
)
from .exits import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_USAGE, CommandError, UsageError, one_line
from .options import (
    add_client_options,
    add_global_options,
    add_host_options,
    add_monitor_options,
    add_output_options,
    add_value_options,
    port_number,
    positive_int,
)

__all__ = ["build_parser", "main"]

logger = logging.getLogger("socketengine")

#: Measured: the full suite (5 runs) took 522 s on 2 cores (docs/bench-results.json).
BENCH_DURATION = "about 9 minutes on 2 cores"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``socketengine`` command."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="socketengine",
        description="Named channels between Python processes: run a host, send, watch, "
        "request, benchmark, and watch a host live in a browser.",
        epilog="Run 'socketengine COMMAND --help' for a command's options.  -v and -q go "
        "before or after COMMAND.  Exit status: 0 success, 1 error, 2 usage error, "
        "130 interrupted.",
        formatter_class=fmt,
    )
    version = f"socketengine {__version__} ({build()} build, Python {platform.python_version()})"
    parser.add_argument("--version", action="version", version=version)
    add_global_options(parser, prefix="global_")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help: str, description: str, epilog: str = "") -> Any:
        p = sub.add_parser(
            name, help=help, description=description, epilog=epilog, formatter_class=fmt
        )
        add_global_options(p)
        p.set_defaults(parser=p)
        return p

    p = command(
        "demo",
        "run a host and a client on loopback exchanging data",
        "Run a host and a client on 127.0.0.1 that exchange values and an image.",
    )
    p.add_argument(
        "--port", type=port_number, default=0, help="port for the demo host (0 = any free)"
    )
    p.set_defaults(func=cmd_demo)

    p = command(
        "host",
        "run a host and print every message",
        "Run a host and print every message as it arrives: time, client "
        "(name@address), channel and a short rendering of the value; and every "
        "request, with the reply it got (this host has no handlers: an error reply).  "
        "Runs until Ctrl-C or SIGTERM (exit 0).",
        "examples:\n  socketengine host --port 8080\n"
        "  socketengine host --json | jq .value\n"
        "  socketengine host --monitor 8000      # and the browser monitor",
    )
    add_host_options(p)
    add_output_options(p)
    p.add_argument(
        "--monitor",
        type=port_number,
        metavar="PORT",
        default=None,
        help="also serve the browser monitor on this port",
    )
    add_monitor_options(p)
    p.set_defaults(func=cmd_host)

    p = command(
        "monitor",
        "run a host with the live browser monitor",
        "Run a host and serve the live browser monitor: its clients, every channel's "
        "latest value and every image channel as live video.  Prints the page's "
        "address; runs until Ctrl-C or SIGTERM.",
        "example:\n  socketengine monitor --port 8080 --monitor 8000   # open the printed URL",
    )
    add_host_options(p)
    p.add_argument(
        "--monitor",
        type=port_number,
        metavar="PORT",
        default=8000,
        help="port of the monitor page (default 8000; 0: any)",
    )
    add_monitor_options(p)
    p.add_argument("--print", action="store_true", help="also print messages, as 'host' does")
    add_output_options(p)
    p.set_defaults(func=cmd_monitor)

    p = command(
        "send",
        "send one value to a host",
        "Connect to a host, send one value on CHANNEL, flush it and exit.  Says what "
        "was sent on standard error (-q: nothing).",
        'examples:\n  socketengine send pose \'{"x": 1.5, "y": -0.2}\'\n'
        "  socketengine send note --raw 'hello world'\n"
        "  socketengine send image --file frame.png      # as a numpy image\n"
        "  socketengine send blob --file data.bin         # as bytes",
    )
    add_value_options(p)
    add_client_options(p)
    p.set_defaults(func=cmd_send)

    p = command(
        "watch",
        "print each value a host sends on channels",
        "Connect to a host as a client and print each new value it sends on the "
        "CHANNELs, or on every channel (what the host writes with write_all() or "
        "conn.write(), and retained values).  Runs until --count, --duration or "
        "SIGTERM (exit 0), or Ctrl-C (exit 130, at once, connecting or not).",
        "example:\n  socketengine watch command config --name watcher",
    )
    p.add_argument(
        "channels", metavar="CHANNEL", nargs="*", help="channel names (none: every channel)"
    )
    add_client_options(p)
    add_output_options(p)
    p.add_argument("--count", type=positive_int, help="exit after this many values")
    p.set_defaults(func=cmd_watch)

    p = command(
        "request",
        "send a request and print the reply",
        "Send VALUE as a request on CHANNEL and print the host's reply as JSON (the "
        "return value of its on(CHANNEL) callback).  An error reply, no handler or no "
        "reply within --timeout exits 1.",
        "example:\n  socketengine request add '[1, 2, 3]'",
    )
    add_value_options(p)
    add_client_options(p)
    p.set_defaults(func=cmd_request)

    p = command(
        "hosts",
        "list the hosts running on a NATS cluster",
        "List the hosts announced on a NATS cluster (Host(url='nats://...', name=...)): "
        "one line per host, name, pid and seconds since its last announcement "
        "(every ~3 s; a host that died without closing stays listed up to 10 s).",
        "examples:\n  socketengine hosts nats://10.0.0.5:4222\n"
        "  socketengine hosts nats://a:4222,nats://b:4222 --json",
    )
    p.add_argument("url", metavar="URL", help="nats://HOST:PORT (comma-separated for a cluster)")
    p.add_argument(
        "--token",
        default=os.environ.get("SOCKETENGINE_TOKEN"),
        help="the cluster's token (default: $SOCKETENGINE_TOKEN)",
    )
    p.add_argument(
        "--timeout", type=float, default=5.0, help="seconds to reach a server (default 5)"
    )
    p.add_argument("--json", action="store_true", help="one JSON object per host")
    p.set_defaults(func=cmd_hosts)

    p = command(
        "bench",
        "run the benchmark suite",
        "Run the benchmark suite (bench/ in the source repository) with a progress bar, "
        f"then print the table.  Full suite: {BENCH_DURATION}, results in docs/.",
        "examples:\n  socketengine bench --quick\n"
        "  socketengine bench --only small,images --runs 3",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 runs: a smoke test")
    p.add_argument("--runs", type=positive_int, help="runs per figure (default 5; quick 2)")
    p.add_argument("--only", metavar="LIST", help="comma-separated workloads (see --list)")
    p.add_argument("--libs", metavar="LIST", help="comma-separated libraries")
    p.add_argument("--scale", type=float, help="multiply every message count by this")
    p.add_argument("--out", metavar="DIR", help="directory for the JSON results and the chart")
    p.add_argument("--list", action="store_true", help="list the workloads and exit")
    p.add_argument(
        "--bench-dir",
        metavar="DIR",
        help="the repository holding bench/ (default: the current directory or the "
        "checkout socketengine is installed from)",
    )
    p.set_defaults(func=cmd_bench)
    return parser


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = build_parser()
    args, extra = parser.parse_known_args(list(argv) if argv is not None else None)
    if (
        extra
        and len(extra) == 1
        and getattr(args, "value", "") is None
        and getattr(args, "file", None) is None
        and not extra[0].startswith("-")
    ):
        # argparse fills CHANNEL [VALUE] at the first positional: 'send ch --raw text'
        # leaves VALUE empty and 'text' over; it is VALUE.
        args.value, extra = extra[0], []
    if extra:
        args.parser.error(f"unrecognized arguments: {' '.join(extra)}")
    # -v/-q before the command and after it add up.
    args.verbose += args.global_verbose
    args.quiet = args.quiet or args.global_quiet
    if args.verbose and args.quiet:
        args.parser.error("-v and -q contradict each other: choose one")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; return the exit status."""
    args = _parse(argv)
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")
    long_running = args.command in ("host", "monitor", "watch")
    if args.quiet:
        level = logging.ERROR
    elif args.verbose:
        level = logging.INFO if args.verbose == 1 else logging.DEBUG
    else:
        level = logging.WARNING if long_running else logging.ERROR
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("socketengine: %(message)s"))
    saved = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    try:
        return int(args.func(args))
    except UsageError as exc:
        print(f"socketengine {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("socketengine: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (CommandError, SocketEngineError, OSError, TimeoutError, ValueError, TypeError) as exc:
        if args.verbose >= 2:
            raise
        print(f"socketengine {args.command}: {one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
