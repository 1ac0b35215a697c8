"""What receiving one large value costs the receiver, as a multiple of its size.

Runs each measurement in a fresh subprocess:

* ``decode``: a frame carrying a ``bytes`` value of ``--mb`` MB goes through
  ``FrameDecoder`` in 256 KiB reads (as from a socket) and is decoded; the growth of
  peak RSS (``ru_maxrss``) over the value's size (the value itself counts 1).
* ``sync_host`` / ``aio_host``: a Host of either layer receives that value from a
  Client in another process; the growth of the host process's peak RSS over the
  value's size.

    python -m bench.memory [--mb 50]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Dict

_DECODE = r"""
import resource, sys
from socketengine import frames
size = int(sys.argv[1])
meta_head = b"\xc6" + size.to_bytes(4, "big")  # msgpack bin 32
head = frames.HEADER.pack(frames.DATA, 0, 3, 0, len(meta_head) + size, 0) + b"big" + meta_head
chunk = b"x" * (256 * 1024)
dec = frames.FrameDecoder(max_message=size + 4096, expect_preamble=False)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
got = dec.feed(head)
left = size
while left:
    n = min(left, len(chunk))
    got += dec.feed(chunk[:n])
    left -= n
out = got[0].value()
del got
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
assert len(out) == size
print((after - before) / size)
"""

_AIO_HOST = r"""
import asyncio, resource, subprocess, sys
from socketengine import aio
size = int(sys.argv[1])
sender = "from socketengine import Client; import sys; c = Client(port=int(sys.argv[1])); "
sender += "c.write('big', b'x' * int(sys.argv[2])); c.close()"
async def main():
    async with aio.Host(port=0, max_message=size + 4096) as h:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        args = ["-c", sender, str(h.port), str(size)]
        proc = await asyncio.create_subprocess_exec(sys.executable, *args)
        await proc.wait()
        for _ in range(6000):
            if h.get("big") is not None:
                break
            await asyncio.sleep(0.01)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print((after - before) / size)
asyncio.run(main())
"""

_HOST = r"""
import resource, subprocess, sys, time
from socketengine import Host
size = int(sys.argv[1])
sender = "from socketengine import Client; import sys; c = Client(port=int(sys.argv[1])); "
sender += "c.write('big', b'x' * int(sys.argv[2])); c.close()"
with Host(port=0, max_message=size + 4096) as h:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    subprocess.run([sys.executable, "-c", sender, str(h.port), str(size)], check=True)
    deadline = time.monotonic() + 60
    while h.get("big") is None and time.monotonic() < deadline:
        time.sleep(0.01)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print((after - before) / size)
"""


def measure(mb: int) -> Dict[str, float]:
    size = mb * 1_000_000
    out = {}
    for name, code in (
        ("decoder", _DECODE),
        ("sync_host", _HOST),
        ("aio_host", _AIO_HOST),
    ):
        run = subprocess.run(
            [sys.executable, "-c", code, str(size)], capture_output=True, text=True, check=True
        )
        out[name] = round(float(run.stdout.split()[-1]), 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=50)
    args = parser.parse_args()
    print(json.dumps({"mb": args.mb, **measure(args.mb)}))


if __name__ == "__main__":
    main()
