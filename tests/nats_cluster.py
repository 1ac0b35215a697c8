"""A 3-node NATS cluster (JetStream, loopback, OS-chosen ports) for the NATS tests.

The runner itself lives in the library (``socketengine.transport.nats.cluster``) so that
``python -m socketengine.transport.nats.cluster`` starts the same cluster by hand.
"""

from __future__ import annotations

from socketengine.transport.nats.cluster import ClusterError, LocalCluster, NatsNode

__all__ = ["LocalCluster", "NatsNode", "ClusterError", "start_cluster"]


def start_cluster(size: int = 3, **kwargs: object) -> LocalCluster:
    """Start a cluster and return it once routes and JetStream are up (caller stops it)."""
    return LocalCluster(size, **kwargs).start()  # type: ignore[arg-type]
