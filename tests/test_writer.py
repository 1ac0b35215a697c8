"""A threaded client's ``write`` (sync/writer.py): the ClientWriter each Client installs
as its ``write``, which also holds the client's current link."""

from __future__ import annotations

from typing import Any, Callable, List

import pytest
from conftest import wait_for

from socketengine import Client, Host, compiled
from socketengine.errors import ConnectionClosed, EndpointClosed
from socketengine.sync.writer import ClientWriter


def test_the_instance_write_is_the_clients_writer(
    host: Host, make_client: Callable[..., Client]
) -> None:
    c = make_client()
    write = c.__dict__["write"]
    if "socketengine.sync.writer" in compiled.modules():
        assert write is c._writer  # called directly: C __call__
    else:
        assert write == c._writer.__call__  # a bound method: one interpreted frame
    assert isinstance(c._writer, ClientWriter) and c._writer.client is c
    c.write("a", 1)
    Client.write(c, "b", [2, "two"])  # the class's method: the same writer
    c.write("c", 3.5, ack=True)  # the acknowledged path
    wait_for(lambda: (host.get("a"), host.get("b"), host.get("c")) == (1, [2, "two"], 3.5))


def test_conn_is_the_writers_link(host: Host, make_client: Callable[..., Client]) -> None:
    c = make_client()
    assert c._conn is not None and c._conn is c._writer.conn
    conn = c._conn
    c._conn = None
    assert c._writer.conn is None
    c._conn = conn
    assert c._writer.conn is conn


def test_a_bad_value_raises_before_anything_is_queued(
    host: Host, make_client: Callable[..., Client]
) -> None:
    c = make_client()
    conn = c._conn
    assert conn is not None
    before = conn.messages_out
    with pytest.raises(TypeError, match="object"):
        c.write("bad", object())
    with pytest.raises(TypeError, match="channel names are str"):
        c.write(5, 1)  # type: ignore[arg-type]
    assert conn.messages_out == before
    c.write("good", 1)
    wait_for(lambda: host.get("good") == 1)


def test_a_subclass_write_is_kept(host: Host) -> None:
    seen: List[Any] = []

    class Logging(Client):
        def write(self, channel: str, data: Any, *args: Any, **kwargs: Any) -> None:
            seen.append((channel, data))
            super().write(channel, data, *args, **kwargs)

    c = Logging(port=host.port)
    try:
        assert "write" not in c.__dict__
        c.write("x", 1)
        c.write_many({"y": 2})  # not through write: not logged
        assert seen == [("x", 1)]
        wait_for(lambda: (host.get("x"), host.get("y")) == (1, 2))
    finally:
        c.close()


def test_write_after_close_raises(host: Host) -> None:
    c = Client(port=host.port, reconnect=False)
    c.close()
    with pytest.raises((EndpointClosed, ConnectionClosed)):
        c.write("late", 1)
