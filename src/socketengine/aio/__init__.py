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
    gets it, and the ``on(channel)`` callbacks are called.

How callbacks are scheduled
    Callbacks (``on(channel)``, request handlers, a host's ``on_connect`` /
    ``on_disconnect``) run **in the event loop, in arrival order per connection**:

    * a plain function is called **inline**, from the loop's read callback, so it must
      not block (run blocking work with ``loop.run_in_executor``);
    * an ``async`` function (anything returning an awaitable) is awaited in a task,
      and every later callback *of the same connection* -- plain or async -- waits
      behind it, so the order is kept.  Callbacks of different connections run
      concurrently.  More than 10,000 callbacks waiting on one connection pause
      reading from it (back-pressure, as for subscriptions).

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

Back-pressure
    ``await write(...)`` returns once the frame is handed to the transport, unless the
    transport's buffer is above its high-water mark: then it waits until the peer has
    taken enough (wrap it in ``asyncio.wait_for`` to bound that).  A subscription that
    holds ``maxsize`` unread items pauses reading from the connection that filled it,
    so the sender's writes block; nothing is dropped.  ``await write()`` does not
    yield to the event loop when the transport takes the frame at once.

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
