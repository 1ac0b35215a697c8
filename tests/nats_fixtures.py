"""pytest fixtures for the NATS tests: ``from nats_fixtures import *`` in a test file.

``nats_cluster``: one 3-node cluster shared by the session; a test may kill nodes, the
fixture restarts them afterwards so the next test finds all three up.
"""

from __future__ import annotations

from typing import Callable, Iterator, List

import pytest

pytest.importorskip("nats", reason="needs nats-py: pip install 'socket.engine[nats]'")

from nats_cluster import ClusterError, LocalCluster, start_cluster  # noqa: E402

from socketengine.transport.nats.cluster import find_server_binary  # noqa: E402
from socketengine.transport.nats.link import NatsLink  # noqa: E402

__all__ = ["nats_session_cluster", "nats_cluster", "make_link"]


@pytest.fixture(scope="session")
def nats_session_cluster() -> Iterator[LocalCluster]:
    try:
        find_server_binary()
    except ClusterError as exc:
        pytest.skip(str(exc))
    cluster = start_cluster(3)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def nats_cluster(nats_session_cluster: LocalCluster) -> Iterator[LocalCluster]:
    yield nats_session_cluster
    for i, node in enumerate(nats_session_cluster.nodes):
        if not node.running:
            nats_session_cluster.restart(i)
    nats_session_cluster.wait_ready(20)


@pytest.fixture
def make_link() -> Iterator[Callable[..., NatsLink]]:
    """``make_link(servers, **connect_kwargs)``: a connected NatsLink, closed after the test."""
    made: List[NatsLink] = []

    def make(servers: object, link_kwargs: object = None, **kwargs: object) -> NatsLink:
        link = NatsLink(**(link_kwargs or {}))  # type: ignore[arg-type]
        made.append(link)
        kwargs.setdefault("connect_timeout", 5.0)
        link.connect(servers, **kwargs)  # type: ignore[arg-type]
        return link

    yield make
    for link in made:
        link.close()
