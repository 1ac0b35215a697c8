"""The ``socketengine`` command line (``python -m socketengine``).

``demo`` runs a host and a client on loopback that exchange messages and an image,
printing what happens.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Callable, List, Optional

from . import __version__
from .errors import SocketEngineError
from .sync.client import Client
from .sync.host import Host


def _wait(condition: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.005)
    raise SystemExit("demo: timed out waiting for data (is something blocking loopback?)")


def demo(args: argparse.Namespace) -> int:
    """Host and client on 127.0.0.1 exchange values and an image."""
    try:
        import numpy as np
    except ImportError:
        print("demo: the image part needs numpy: pip install 'socket.engine[numpy]'")
        return 1
    out = print
    with Host(port=args.port) as h:
        out(f"host    listening on 127.0.0.1:{h.port}")
        with Client(port=h.port, name="demo-client") as c:
            out(f"client  connected as {c.name!r}")
            c.write("test", "client is connected!")
            c.write("pose", {"x": 1.5, "y": -0.25, "tags": ("arm", "left")})
            _wait(lambda: h.get_all("pose"))
            out(f"host    get_all('test') -> {h.get_all('test')!r}")
            out(f"host    get('pose')     -> {h.get('pose')!r}")

            h.write_all("command", ["move", 3])
            _wait(lambda: c.get("command"))
            out(f"client  get('command')  -> {c.get('command')!r}")

            y, x = np.mgrid[0:480, 0:640]
            image = np.dstack([x % 256, y % 256, (x + y) % 256]).astype(np.uint8)
            t0 = time.perf_counter()
            c.write_image(image)
            _wait(lambda: h.get("image") is not None)
            ms = (time.perf_counter() - t0) * 1000
            got = h.get("image")
            same = bool(np.array_equal(got, image))
            out(f"host    image {got.shape} {got.dtype} received in {ms:.1f} ms, identical: {same}")
            for conn in h.clients():
                out(f"host    client {conn.name!r} at {conn.address[0]}:{conn.address[1]}")
    out("both    closed cleanly")
    return 0 if same else 1


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="socketengine", description="Named channels between Python processes."
    )
    parser.add_argument("--version", action="version", version=f"socketengine {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="run a host and a client on loopback exchanging data")
    p.add_argument("--port", type=int, default=0, help="port for the demo host (0 = any free)")
    p.set_defaults(func=demo)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (SocketEngineError, OSError) as exc:
        print(f"socketengine: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
