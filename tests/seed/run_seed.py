"""Run a verbatim seed example with the default port redirected.

The seed examples use the default port 8080; tests must never use a fixed port, so
this runner changes the *default* of ``port`` (nothing else) and then executes the
example file unchanged:

    python run_seed.py host           # port 0; prints "PORT <n>" on stderr once open
    python run_seed.py client <port>  # connects to <port>
"""

import sys
from pathlib import Path

from socketengine import Client, Host

role = sys.argv[1]
if role == "host":
    Host.__init__.__defaults__ = ("127.0.0.1", 0, 2, 256, True)
    _open = Host.open

    def _open_and_report(self):  # type: ignore[no-untyped-def]
        result = _open(self)
        print(f"PORT {self.port}", file=sys.stderr, flush=True)
        return result

    Host.open = _open_and_report  # type: ignore[method-assign]
else:
    Client.__init__.__defaults__ = ("127.0.0.1", int(sys.argv[2]), 2, 256, True)

source = (Path(__file__).parent / f"seed_{role}.py").read_text()
exec(compile(source, f"seed_{role}.py", "exec"))
