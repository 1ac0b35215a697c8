"""Received JPEG/PNG images, decoded lazily and off the event loop (asyncio layer).

``data_received`` never decodes: a received :class:`~socketengine.images.EncodedImage`
is stored as it is, and handed to waiters, subscriptions and callbacks wrapped in a
:class:`LazyImage`.  The first consumer that needs the pixels starts the decoding in the
loop's default executor (a worker thread: every codec backend releases the GIL), so a
5 ms JPEG decode never stalls the event loop; every other consumer of the same frame
awaits the same result (decoded once).  ``get()`` decodes synchronously instead (the
caller asked for the value now), also once: the decoded array replaces the stored file.
"""

from __future__ import annotations

import asyncio
from typing import Any, Dict, Optional, Sequence, Tuple

from ..images import EncodedImage

__all__ = ["LazyImage", "pending", "resolve", "resolve_now"]

#: Where a decoded array should replace the file it came from: ``(table, channel)``.
Store = Tuple[Dict[str, Any], str]


class LazyImage:
    """One received encoded image, decoded at most once, on first use.

    :param encoded: the received image.
    :param stores: latest-value tables whose entry for the channel should become the
        decoded array once it is known (if they still hold ``encoded`` then).
    """

    __slots__ = ("encoded", "_stores", "_future", "_value", "_done")

    def __init__(self, encoded: EncodedImage, stores: Sequence[Store] = ()) -> None:
        self.encoded = encoded
        self._stores = stores
        self._future: Optional[asyncio.Future[Any]] = None
        self._value: Any = None
        self._done = False

    @property
    def done(self) -> bool:
        """True once the decoded array is known (awaiting it does not block)."""
        return self._done

    async def decoded(self) -> Any:
        """The decoded numpy array; decoding runs in a worker thread, once.

        Raises ``ValueError`` (a corrupt or inconsistent file) or
        :class:`~socketengine.CodecUnavailable` as :func:`socketengine.images.decode` does.
        """
        if self._done:
            return self._value
        future = self._future
        if future is None:
            loop = asyncio.get_running_loop()
            future = self._future = loop.run_in_executor(None, self.encoded.decode)
            future.add_done_callback(self._finished)
        # Shielded: a consumer that is cancelled must not cancel the others' decoding.
        return await asyncio.shield(future)

    def decode_now(self) -> Any:
        """The decoded array, decoded here (blocking) unless it is already known."""
        if not self._done:
            self._set(self.encoded.decode())
        return self._value

    def _finished(self, future: asyncio.Future[Any]) -> None:
        if future.cancelled():
            self._future = None
            return
        exc = future.exception()  # retrieved here, so it is never "never retrieved"
        if exc is None and not self._done:
            self._set(future.result())

    def _set(self, value: Any) -> None:
        self._value = value
        self._done = True
        for table, channel in self._stores:
            if table.get(channel) is self.encoded:
                table[channel] = value
        self._stores = ()

    def __repr__(self) -> str:
        state = "decoded" if self._done else "encoded"
        return f"<LazyImage {self.encoded!r} {state}>"


def _lazy_at(item: Any) -> int:
    """Where the :class:`LazyImage` of a delivered tuple item is (``(value, conn)``,
    ``(channel, value)``, ``(channel, value, conn)``), or -1."""
    if type(item) is tuple and len(item) <= 3:
        for i, part in enumerate(item):
            if type(part) is LazyImage:
                return i
    return -1


def pending(item: Any) -> Optional[LazyImage]:
    """The :class:`LazyImage` in a delivered ``item`` (a value, or a tuple such as
    ``(value, conn)``) if it still has to be decoded, else ``None``."""
    if type(item) is LazyImage:
        return None if item.done else item
    at = _lazy_at(item)
    if at >= 0:
        image: LazyImage = item[at]
        return None if image.done else image
    return None


async def resolve(item: Any) -> Any:
    """``item`` as the application sees it: a lazy image replaced by its array."""
    if type(item) is LazyImage:
        return await item.decoded()
    at = _lazy_at(item)
    if at >= 0:
        return (*item[:at], await item[at].decoded(), *item[at + 1 :])
    return item


def resolve_now(item: Any) -> Any:
    """:func:`resolve`, decoding synchronously if needed (for non-async accessors)."""
    if type(item) is LazyImage:
        return item.decode_now()
    at = _lazy_at(item)
    if at >= 0:
        return (*item[:at], item[at].decode_now(), *item[at + 1 :])
    return item
