"""Who watches channels by pattern (sans-I/O), for both I/O layers.

Exact channel names are looked up in plain dicts on the hot path (each layer keeps
its own, guarded as it needs).  Registrations made with a
:class:`~socketengine.patterns.Pattern` live here, in a
:class:`~socketengine.patterns.Matcher` (lock-free reads, a per-channel cache), with
the rules both layers share:

* a pattern ``wait()`` is one-shot: the first matching message takes it away;
* a pattern subscription gets every matching message, in order;
* pattern callbacks and items carry the concrete channel name:
  ``fn(channel, data)`` / ``(channel, data)`` on a client, with ``conn`` added on a
  host (``fn(channel, data, conn)``, ``(channel, data, conn)``);
* pattern callbacks never answer requests (a request names one exact channel).

The layers fire what :meth:`PatternWatch.take` returns with their own primitives
(threads and events, or tasks and futures).
"""

from __future__ import annotations

from typing import Any, Callable, Generic, Iterable, List, Optional, Tuple, TypeVar

from . import frames
from .patterns import Matcher, Pattern

__all__ = ["PatternWatch", "Fired", "check_key", "pattern_item", "matching_channels"]

W = TypeVar("W")  # a waiter
S = TypeVar("S")  # a subscription

_ON = "on"
_WAIT = "wait"
_SUB = "sub"


class Fired(Generic[W, S]):
    """What one message triggers among pattern registrations."""

    __slots__ = ("waiters", "subs", "callbacks")

    def __init__(self) -> None:
        self.waiters: List[W] = []
        self.subs: List[S] = []
        self.callbacks: List[Callable[..., Any]] = []


class PatternWatch(Generic[W, S]):
    """Callbacks, waiters and subscriptions registered with a :class:`Pattern`."""

    def __init__(self) -> None:
        self._matcher: Matcher[Tuple[str, Any]] = Matcher()

    def __bool__(self) -> bool:
        return bool(self._matcher)

    def on(self, pattern: Pattern, fn: Callable[..., Any]) -> None:
        self._matcher.add(pattern, (_ON, fn))

    def off(self, pattern: Pattern, fn: Optional[Callable[..., Any]] = None) -> None:
        """Remove ``fn`` (``None``: every callback) registered for ``pattern``."""
        for key, entry in self._matcher.items():
            if key == pattern and entry[0] == _ON and (fn is None or entry[1] == fn):
                self._matcher.discard(key, entry)

    def wait(self, pattern: Pattern, waiter: W) -> None:
        self._matcher.add(pattern, (_WAIT, waiter))

    def unwait(self, pattern: Pattern, waiter: W) -> None:
        self._matcher.discard(pattern, (_WAIT, waiter))

    def subscribe(self, pattern: Pattern, sub: S) -> None:
        self._matcher.add(pattern, (_SUB, sub))

    def unsubscribe(self, pattern: Pattern, sub: S) -> None:
        self._matcher.discard(pattern, (_SUB, sub))

    def take(self, channel: str) -> Optional[Fired[W, S]]:
        """What a message on ``channel`` triggers (``None``: nothing); matching
        waiters are removed (one-shot)."""
        matches = self._matcher.match(channel)
        if not matches:
            return None
        fired: Fired[W, S] = Fired()
        for key, (kind, target) in matches:
            if kind is _ON:
                fired.callbacks.append(target)
            elif kind is _SUB:
                fired.subs.append(target)
            elif self._matcher.discard(key, (kind, target)):  # one-shot, taken once
                fired.waiters.append(target)
        return fired

    def all_waiters(self) -> List[W]:
        """Every pattern waiter (the endpoint closes: they must be woken)."""
        return [t for _, (kind, t) in self._matcher.items() if kind is _WAIT]

    def all_subs(self) -> List[S]:
        return [t for _, (kind, t) in self._matcher.items() if kind is _SUB]


def check_key(channel: object) -> None:
    """A channel argument: an exact name (validated: ``TypeError``/``ValueError``) or a
    :class:`~socketengine.patterns.Pattern`."""
    if not isinstance(channel, Pattern):
        frames.channel_bytes(channel)


def pattern_item(channel: str, value: Any, conn: Any, with_conn: bool) -> Tuple[Any, ...]:
    """A pattern subscription's or waiter's item: ``(channel, data)`` on a client,
    ``(channel, data, conn)`` on a host."""
    return (channel, value, conn) if with_conn else (channel, value)


def matching_channels(pattern: Pattern, tables: Iterable[Iterable[str]]) -> List[str]:
    """The channel names in ``tables`` (each peer's latest values) that ``pattern``
    matches, sorted (``get_all(Pattern(...))``)."""
    names = {name for table in tables for name in list(table)}
    return sorted(name for name in names if pattern.match(name))
