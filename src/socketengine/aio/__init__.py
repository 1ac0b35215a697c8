"""socketengine for asyncio: ``Host`` and ``Client`` as coroutines, same wire protocol.

An :class:`aio.Client <Client>` talks to a threaded :class:`socketengine.Host` and a
threaded :class:`socketengine.Client` to an :class:`aio.Host <Host>`: both layers run the
same sans-I/O core (:mod:`socketengine.protocol`, :mod:`socketengine.frames`,
:mod:`socketengine.codec`).  Here it runs inside an ``asyncio.BufferedProtocol``: the
event loop receives straight into the frame decoder's buffer; no extra thread exists.

.. code-block:: python

    from socketengine import aio

    async with aio.Host(port=0) as h, aio.Client(port=h.port, name="cam") as c:
        await c.write("pose", {"x": 1.5})
        data, conn = await h.wait("pose", timeout=5)      # next message on "pose"
        async for value in c.subscribe("cmd"):            # every message, in order
            ...

Receiving
    Every received value is stored (``get``) before anything else sees it.  Then, in
    this order: futures of ``wait(channel)`` get it, every ``subscribe(channel)`` queue
    gets it, the ``on(channel)`` callbacks are called, then the ``on_message`` hooks
    (``fn(channel, data)`` on a client, ``fn(channel, data, conn)`` on a host).

How callbacks are scheduled
    Callbacks (``on(channel)``, ``on_message``, request handlers, a host's
    ``on_connect`` / ``on_disconnect``) run **in the event loop, in arrival order per
    connection**:

    * a plain function is called **inline**, from the loop's read callback, so it must
      not block (run blocking work with ``loop.run_in_executor``);
    * an ``async`` function (anything returning an awaitable) is awaited in a task,
      and every later callback *of the same connection* -- plain or async -- waits
      behind it, so the order is kept.  Callbacks of different connections run
      concurrently.  More than 10,000 callbacks waiting on one connection pause
      reading from it (back-pressure, as for subscriptions);
    * a message carrying a JPEG/PNG image is decoded in a worker thread first (see
      *Images*), and the connection's later callbacks wait behind it the same way.

    An exception in a callback is logged on ``logging.getLogger("socketengine")`` and
    changes nothing else.  ``close()`` lets running callbacks finish for up to
    ``timeout`` s, then cancels them.

Requests
    ``await peer.request(channel, data, timeout=5.0)`` sends a REQUEST frame; the
    other side's ``on(channel)`` handlers run (in the order above) and the return value
    of the first one -- awaited if it is a coroutine -- is the reply.  A handler that
    raises makes the requester raise :class:`~socketengine.RemoteError`
    (``"ExceptionType: message"``); so does a channel without a handler.  Request
    values are not stored and do not reach ``wait`` or ``subscribe``.

Back-pressure and memory
    ``await write(...)`` returns once the frame is handed to the transport.  While the
    transport's buffer is above its high-water mark it then waits until the peer has
    taken enough (as ``StreamWriter.drain`` does), but for at most ``timeout`` s: a
    peer that takes nothing for that long is *stalled*, and writes stop waiting for it
    until it drains.  ``max_buffer`` (default 256 MiB) bounds the memory per peer: a
    write that would take the buffer beyond it waits up to ``timeout`` s for room and
    then raises :class:`~socketengine.WriteTimeout`, sending nothing.  A host's
    ``write_all`` / ``write_image_all`` never wait for one client: a client whose
    buffer stays above ``max_buffer`` for ``timeout`` s (or would exceed twice it) is
    disconnected as a slow consumer (logged, ``on_disconnect``) and the others go on
    receiving everything.  A subscription that holds ``maxsize`` unread items pauses
    reading from the connection that filled it, so the sender's writes block; nothing
    is dropped.  ``await write()`` does not yield to the event loop when the transport
    takes the frame at once.  Writes in a burst (within 50 µs of each other;
    broadcasts within 1 ms) are handed to the transport by one pump on the loop's next
    step, or as soon as 64 KiB wait; a host queues a burst of small ``write_all``
    values once, in runs of up to 256, handed to every client's queue together
    (``socketengine/fanout.py``).

Images
    ``write_image(img, channel="image", codec=None, quality=None)`` (client and host
    connections) and ``write_image_all`` (host) send numpy images raw or as JPEG/PNG
    (``image_codec`` / ``image_quality`` on the endpoint are the defaults), validated
    before anything is sent and encoded once, in a worker thread.  Image frames are
    *conflated*: while a peer's transport is paused (above its high-water mark), the
    newest frame per channel waits in a slot and replaces an older one that has not
    been handed over yet (counted in ``images_dropped`` and ``stats()``); the slot is
    sent when the transport resumes.  So a slow receiver gets the newest frame, never a
    backlog, and an image write never waits.  (Parked frames go out after plain values
    written meanwhile: images may be late relative to them, never older than them.)
    Received JPEG/PNG images are never decoded while reading: ``get()`` decodes on the
    spot (once; the array replaces the stored file), while waiters, subscriptions,
    callbacks and ``on_message`` hooks get arrays decoded in the loop's default
    executor, once per frame whoever consumes it, so the event loop is not blocked.
    ``get_jpeg(channel)`` returns the file itself; ``stats()`` counts frames per
    channel and direction.

Heartbeats
    With ``heartbeat=5.0`` (seconds, both sides; ``None`` disables) an idle link
    (nothing sent for ``heartbeat`` s) carries a PING, which the peer's core answers.
    A peer that sends nothing for ``3 * heartbeat`` s is declared dead and its
    connection aborted (a host calls ``on_disconnect``, a client reconnects), unless
    this side paused reading it (back-pressure): then its silence proves nothing.

Reconnect (client)
    With ``reconnect=True`` (the default) a lost connection -- the host restarted,
    closed it, or stopped answering heartbeats -- is re-established by a background
    task with exponential backoff (from 0.02 s, doubling, capped at ``reconnect_max``
    s, +-20 % jitter).  Meanwhile writes are kept, in order, up to ``max_buffer`` bytes
    (an image replaces the kept image of its channel) and sent first once the new
    handshake completes; beyond that ``await write`` waits up to ``timeout`` s and
    raises :class:`~socketengine.WriteTimeout`.  ``request()`` raises
    :class:`~socketengine.ConnectionClosed` at once while disconnected; ``wait`` and
    subscriptions go on across reconnections.  A named client comes back under its
    name.  ``connected`` and ``reconnects`` tell the state.  ``reconnect=False`` makes a
    loss final.

TLS
    ``tls=ssl.SSLContext`` on both sides runs everything inside TLS (asyncio's own
    ``ssl=``; the client verifies the host's certificate against ``addr``).  The TLS
    handshake counts against ``handshake_timeout``.  A plaintext client of a TLS host,
    a TLS client of a plaintext host, or an untrusted certificate fail with
    :class:`~socketengine.HandshakeError` saying so.  Over TLS there is no half-close
    after BYE (it would end the TLS session): BYE alone ends the connection, as in the
    threaded layer, which interoperates both ways.

Arrays
    numpy arrays are sent without copying their buffers: the transport may keep a
    reference to an array's memory until the bytes are on the socket (Python 3.12+
    transports do), so do not modify an array in place after writing it -- write a
    new array (or a copy) instead, as with the threaded layer.
"""

from __future__ import annotations

from .client import Client
from .connection import Connection
from .host import Host
from .subscription import Subscription

__all__ = ["Host", "Client", "Connection", "Subscription"]
