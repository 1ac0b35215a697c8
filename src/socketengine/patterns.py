"""Channel patterns, a pattern index and client interest.  Sans-I/O: no sockets, no threads.

Syntax
------
Channel names are split into *levels* on ``/`` (``"robot1/sensors/temp"`` has three
levels; empty levels count: ``"a//b"`` has three, ``""`` has one).  A pattern is written
like an MQTT topic filter:

``+``
    matches exactly one level, whatever it holds (an empty level too):
    ``sensors/+/temp`` matches ``sensors/left/temp``, not ``sensors/temp`` nor
    ``sensors/a/b/temp``.
``#``
    matches any number of levels, zero included, and must be the last level:
    ``robot1/#`` matches ``robot1``, ``robot1/arm`` and ``robot1/arm/joint3``; ``#``
    alone matches every channel.

Any other level matches only itself, character for character (``*``, ``?`` and every
other character are literal).  ``+`` and ``#`` are wildcards only as a whole level:
``a+/b`` and ``a/#b`` are rejected rather than silently read as literals.

Patterns are explicit objects: ``Pattern("sensors/+/temp")``.  A plain ``str`` is
**always** an exact channel name, even ``"a/+"`` or ``"#"``: no channel name ever changes
meaning because it happens to contain a wildcard character, and code written before
patterns existed keeps its behaviour.

A malformed pattern raises ``ValueError`` when the :class:`Pattern` is built (a non-str
raises ``TypeError``, as for channel names): empty, longer than
:data:`MAX_PATTERN_BYTES` UTF-8 bytes, ``#`` before the last level, or ``+``/``#`` mixed
into a level.

Pieces
------
:class:`Pattern`
    one parsed pattern: ``match(name) -> bool``; hashable, compares by its text.
:class:`Matcher`
    an index of ``(key, item)`` entries, key an exact name or a :class:`Pattern`:
    ``match(channel)`` returns every entry whose key matches, in the order they were
    added.  Made for a hot read path: a trie over levels, and a per-channel result cache
    (names repeat on a stream).  Readers take no lock: every ``add``/``remove`` builds a
    new immutable index (copying only the trie path it changes) and publishes it with
    one attribute assignment, so an I/O thread can call ``match`` on every message while
    user threads subscribe and unsubscribe.
:class:`Interest`
    the set of exact names and patterns a client declared: ``wants(channel)`` tells
    the host whether to send that channel to it.  Empty means everything.  A declared
    interest has at most :data:`MAX_INTEREST_KEYS` keys of at most
    :data:`MAX_INTEREST_BYTES` UTF-8 bytes together (:meth:`Interest.declared` for a
    client, :meth:`Interest.from_wire` for a host).
:func:`to_wire` / :func:`from_wire`
    one key as a msgpack-ready map, ``{"c": name}`` or ``{"p": pattern}``; decoding
    validates and raises :class:`~socketengine.errors.ProtocolError` on anything else.
"""

from __future__ import annotations

import re
import threading
from typing import (
    Any,
    Dict,
    FrozenSet,
    Generic,
    Iterable,
    Iterator,
    List,
    Optional,
    Tuple,
    TypeVar,
    Union,
)

from .errors import ProtocolError

__all__ = [
    "Pattern",
    "Key",
    "Matcher",
    "Interest",
    "to_wire",
    "from_wire",
    "MAX_PATTERN_BYTES",
    "MAX_CHANNEL_BYTES",
    "MAX_INTEREST_KEYS",
    "MAX_INTEREST_BYTES",
]

#: Longest pattern, in UTF-8 bytes.
MAX_PATTERN_BYTES = 256
#: Longest exact channel name accepted by :func:`from_wire`: the frame header's limit
#: (a u16 length, see ``frames.channel_bytes``).
MAX_CHANNEL_BYTES = 0xFFFF
#: Most keys in one declared interest (a protocol limit: HELLO ``interest`` and INTEREST).
#: A host closes the connection of a peer that declares more; a client refuses to
#: declare more (``ValueError``).  With :data:`MAX_INTEREST_BYTES` it keeps every
#: interest a client may declare, encoded (at most ~41 KiB), inside the 64 KiB handshake
#: frame limit next to a 16 KiB will.
MAX_INTEREST_KEYS = 2048
#: Most UTF-8 bytes of names and pattern texts, together, in one declared interest (a
#: protocol limit, enforced like :data:`MAX_INTEREST_KEYS`).  The host's pattern index
#: takes up to ~250 bytes per level (an empty level is one byte of text), so this bounds
#: what one interest makes a host hold to ~8 MiB (``docs/guarantees.md``).
MAX_INTEREST_BYTES = 32 * 1024
#: Channel names whose results a :class:`Matcher` or :class:`Interest` remembers.  Names
#: come from peers: past this many, new names are matched without being cached.
CACHE_SIZE = 4096

T = TypeVar("T")


class Pattern:
    """A channel pattern: ``+`` is one level, ``#`` (last) any number of levels.

    >>> Pattern("sensors/+/temp").match("sensors/left/temp")
    True
    >>> Pattern("robot1/#").match("robot1")
    True

    :raises TypeError: ``text`` is not a str.
    :raises ValueError: ``text`` is not a valid pattern; the message says why.
    """

    __slots__ = ("_text", "_levels", "_regex", "_hash")

    _text: str
    _levels: Tuple[str, ...]
    _regex: Optional[re.Pattern]
    _hash: int

    def __init__(self, text: str) -> None:
        if type(text) is not str:
            raise TypeError(
                f"a pattern is written as a str, not {type(text).__qualname__}: got {text!r}"
            )
        if not text:
            raise ValueError(
                "empty pattern: write '#' for every channel; the channel named '' is the "
                "exact key '' (a plain str)"
            )
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError:
            raise ValueError(f"pattern {text!r} is not valid Unicode (lone surrogate)") from None
        if size > MAX_PATTERN_BYTES:
            raise ValueError(
                f"pattern is {size} UTF-8 bytes long; the limit is {MAX_PATTERN_BYTES}"
            )
        levels = tuple(text.split("/"))
        last = len(levels) - 1
        for i, level in enumerate(levels):
            if level == "#":
                if i != last:
                    raise ValueError(
                        f"pattern {text!r}: '#' matches the rest of the name and must be the "
                        "last level (use '+' for one level in the middle)"
                    )
            elif level != "+" and ("+" in level or "#" in level):
                raise ValueError(
                    f"pattern {text!r}: level {level!r} mixes '+' or '#' with other "
                    "characters; a wildcard must be a whole level between '/' (e.g. "
                    "'a/+/b'), and a literal '+' or '#' can only be matched with an exact "
                    "channel name (a plain str)"
                )
        object.__setattr__(self, "_text", text)
        object.__setattr__(self, "_levels", levels)
        object.__setattr__(self, "_regex", None)
        object.__setattr__(self, "_hash", hash((Pattern, text)))

    @property
    def text(self) -> str:
        """The pattern as written."""
        return self._text

    @property
    def levels(self) -> Tuple[str, ...]:
        """The pattern's levels (``"a/+/#"`` -> ``("a", "+", "#")``)."""
        return self._levels

    @property
    def is_literal(self) -> bool:
        """True if the pattern has no wildcard: it matches one channel name only."""
        return "+" not in self._levels and "#" not in self._levels

    def match(self, name: str) -> bool:
        """True if the channel ``name`` matches this pattern."""
        regex = self._regex
        if regex is None:
            regex = _compile(self._levels)
            object.__setattr__(self, "_regex", regex)
        return regex.fullmatch(name) is not None

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Pattern is immutable")

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Pattern):
            return self._text == other._text
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        if isinstance(other, Pattern):
            return self._text != other._text
        return NotImplemented

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        return f"Pattern({self._text!r})"

    def __str__(self) -> str:
        return self._text

    def __reduce__(self) -> Tuple[Any, Tuple[str]]:
        return (Pattern, (self._text,))


def _compile(levels: Tuple[str, ...]) -> re.Pattern:
    parts: List[str] = []
    for i, level in enumerate(levels):
        if level == "#":
            # zero levels (then no '/'), or '/' and anything; '#' alone: anything at all
            parts.append("(?:/.*)?" if i else ".*")
        else:
            if i:
                parts.append("/")
            parts.append("[^/]*" if level == "+" else re.escape(level))
    return re.compile("".join(parts), re.DOTALL)


#: A key: an exact channel name (any str) or a :class:`Pattern`.
Key = Union[str, Pattern]


def _check_key(key: object) -> None:
    if type(key) is not str and not isinstance(key, Pattern):
        raise TypeError(
            "a key is an exact channel name (str) or a Pattern, not "
            f"{type(key).__qualname__}: got {key!r}"
        )


# -- trie -------------------------------------------------------------------------------------
#
# Nodes are never changed once published: an update copies the nodes on the path it
# changes (path copying), so a reader holding the previous root sees a consistent trie.


class _Node:
    __slots__ = ("children", "plus", "end", "rest")

    def __init__(self) -> None:
        self.children: Dict[str, _Node] = {}  # literal level -> node
        self.plus: Optional[_Node] = None  # '+' level -> node
        self.end: Tuple[Any, ...] = ()  # entries whose pattern ends at this node
        self.rest: Tuple[Any, ...] = ()  # entries whose pattern is this node + '/#'

    def copy(self) -> _Node:
        n = _Node()
        n.children = self.children.copy()
        n.plus = self.plus
        n.end = self.end
        n.rest = self.rest
        return n

    def empty(self) -> bool:
        return not (self.children or self.plus or self.end or self.rest)


def _trie_add(node: Optional[_Node], levels: Tuple[str, ...], i: int, entry: Any) -> _Node:
    """A copy of ``node`` (or a new node) with ``entry`` added at ``levels[i:]``."""
    n = node.copy() if node is not None else _Node()
    if i == len(levels):
        n.end = n.end + (entry,)
        return n
    level = levels[i]
    if level == "#":
        n.rest = n.rest + (entry,)
    elif level == "+":
        n.plus = _trie_add(n.plus, levels, i + 1, entry)
    else:
        n.children[level] = _trie_add(n.children.get(level), levels, i + 1, entry)
    return n


def _trie_insert(root: _Node, levels: Tuple[str, ...], entry: Any) -> None:
    """Add ``entry`` at ``levels`` to a trie that is still being built (no reader holds
    it yet): nodes are changed in place, nothing is copied."""
    n = root
    for level in levels:
        if level == "#":  # always the last level (Pattern checks it)
            n.rest = n.rest + (entry,)
            return
        if level == "+":
            child = n.plus
            if child is None:
                child = n.plus = _Node()
        else:
            child = n.children.get(level)
            if child is None:
                child = n.children[level] = _Node()
        n = child
    n.end = n.end + (entry,)


def _trie_remove(node: _Node, levels: Tuple[str, ...], i: int, entry: Any) -> Optional[_Node]:
    """A copy of ``node`` without ``entry`` (known to be present); None if it empties."""
    n = node.copy()
    if i == len(levels):
        n.end = tuple(e for e in n.end if e is not entry)
    else:
        level = levels[i]
        if level == "#":
            n.rest = tuple(e for e in n.rest if e is not entry)
        elif level == "+":
            assert n.plus is not None
            n.plus = _trie_remove(n.plus, levels, i + 1, entry)
        else:
            child = _trie_remove(n.children[level], levels, i + 1, entry)
            if child is None:
                del n.children[level]
            else:
                n.children[level] = child
    return None if n.empty() else n


def _trie_collect(node: _Node, levels: List[str], i: int, out: List[Any]) -> None:
    # ``node`` was reached with levels[:i] consumed
    if node.rest:
        out.extend(node.rest)  # '#': zero or more further levels
    if i == len(levels):
        if node.end:
            out.extend(node.end)
        return
    child = node.children.get(levels[i])
    if child is not None:
        _trie_collect(child, levels, i + 1, out)
    if node.plus is not None:
        _trie_collect(node.plus, levels, i + 1, out)


def _trie_any(node: _Node, levels: List[str], i: int) -> bool:
    if node.rest:
        return True
    if i == len(levels):
        return bool(node.end)
    child = node.children.get(levels[i])
    if child is not None and _trie_any(child, levels, i + 1):
        return True
    return node.plus is not None and _trie_any(node.plus, levels, i + 1)


# -- Matcher ----------------------------------------------------------------------------------


class _Entry:
    """One ``(key, item)`` of a Matcher; ``seq`` orders results by insertion."""

    __slots__ = ("seq", "key", "item", "pair")

    def __init__(self, seq: int, key: Key, item: Any) -> None:
        self.seq = seq
        self.key = key
        self.item = item
        self.pair = (key, item)


def _seq(entry: _Entry) -> int:
    return entry.seq


class _Index:
    """One immutable state of a Matcher; only ``cache`` is ever written after publishing.

    ``by_key`` maps every key to its entries.  A str and a Pattern never compare equal,
    so looking a channel name up in it finds the exact entries only.
    """

    __slots__ = ("by_key", "root", "count", "cache")

    def __init__(
        self, by_key: Dict[Key, Tuple[_Entry, ...]], root: Optional[_Node], count: int
    ) -> None:
        self.by_key = by_key
        self.root = root
        self.count = count
        self.cache: Dict[str, Tuple[Tuple[Key, Any], ...]] = {}

    def compute(self, channel: str) -> Tuple[Tuple[Key, Any], ...]:
        found: List[_Entry] = list(self.by_key.get(channel, ()))
        if self.root is not None:
            _trie_collect(self.root, channel.split("/"), 0, found)
        if not found:
            return ()
        if len(found) > 1:
            found.sort(key=_seq)
        return tuple(e.pair for e in found)

    def entries(self) -> List[_Entry]:
        out = [e for entries in self.by_key.values() for e in entries]
        out.sort(key=_seq)
        return out


def _empty_index() -> _Index:
    # a fresh one each time: an index's cache belongs to it alone
    return _Index({}, None, 0)


class Matcher(Generic[T]):
    """Entries ``(key, item)``, key an exact channel name (str) or a :class:`Pattern`.

    ``match(channel)`` returns the entries whose key matches ``channel``: the exact ones
    and the patterns', in the order they were added.  A pair is held once: adding it
    again does nothing (items are compared with ``==``).

    Thread-safety: ``match``, ``__len__``, ``keys`` and ``items`` take no lock and may run
    in any thread while others call ``add``/``remove`` (which serialise on a lock, build
    a new index and publish it atomically).  A reader sees the index before or after an
    update, never a mix.  Cost: ``match`` is one dict lookup for a channel seen since the
    last update (up to :data:`CACHE_SIZE` names); otherwise a walk of the trie, whose
    cost grows with the channel's depth and the wildcards on its path, not with the
    number of patterns.  ``add``/``remove`` copy the key table (one C-level dict copy) and
    the trie nodes on the key's path.
    """

    __slots__ = ("_index", "_lock", "_next_seq")

    def __init__(self, entries: Iterable[Tuple[Key, T]] = ()) -> None:
        self._index = _empty_index()
        self._lock = threading.Lock()
        self._next_seq = 0
        for key, item in entries:
            self.add(key, item)

    def match(self, channel: str) -> Tuple[Tuple[Key, T], ...]:
        """``(key, item)`` of every entry matching ``channel``, in insertion order."""
        index = self._index
        result = index.cache.get(channel)
        if result is None:
            result = index.compute(channel)
            if len(index.cache) < CACHE_SIZE:
                index.cache[channel] = result
        return result

    def items_for(self, channel: str) -> List[T]:
        """The items of :meth:`match` (an item added under two matching keys comes twice)."""
        return [item for _, item in self.match(channel)]

    def add(self, key: Key, item: T) -> bool:
        """Add ``(key, item)``; False if that pair was already there.

        :raises TypeError: ``key`` is neither a str nor a :class:`Pattern`.
        """
        _check_key(key)
        with self._lock:
            old = self._index
            same = old.by_key.get(key, ())
            if _find(same, item) is not None:
                return False
            entry = _Entry(self._next_seq, key, item)
            self._next_seq += 1
            by_key = old.by_key.copy()
            by_key[key] = same + (entry,)
            root = old.root
            if isinstance(key, Pattern):
                root = _trie_add(root, key.levels, 0, entry)
            self._index = _Index(by_key, root, old.count + 1)
            return True

    def remove(self, key: Key, item: T) -> None:
        """Remove ``(key, item)``.

        :raises KeyError: the pair is not in the matcher.
        """
        if not self.discard(key, item):
            raise KeyError((key, item))

    def discard(self, key: Key, item: T) -> bool:
        """Remove ``(key, item)`` if present; True if it was."""
        _check_key(key)
        with self._lock:
            old = self._index
            same = old.by_key.get(key, ())
            entry = _find(same, item)
            if entry is None:
                return False
            if old.count == 1:
                self._index = _empty_index()
                return True
            by_key = old.by_key.copy()
            rest = tuple(e for e in same if e is not entry)
            if rest:
                by_key[key] = rest
            else:
                del by_key[key]
            root = old.root
            if isinstance(key, Pattern):
                assert root is not None
                root = _trie_remove(root, key.levels, 0, entry)
            self._index = _Index(by_key, root, old.count - 1)
            return True

    def clear(self) -> None:
        """Remove every entry."""
        with self._lock:
            self._index = _empty_index()

    def keys(self) -> FrozenSet[Key]:
        """Every key that has at least one entry."""
        return frozenset(self._index.by_key)

    def items(self) -> Tuple[Tuple[Key, T], ...]:
        """Every ``(key, item)``, in insertion order."""
        return tuple(e.pair for e in self._index.entries())

    def __len__(self) -> int:
        return self._index.count

    def __bool__(self) -> bool:
        return self._index.count > 0

    def __iter__(self) -> Iterator[Tuple[Key, T]]:
        return iter(self.items())

    def __repr__(self) -> str:
        return f"Matcher({list(self.items())!r})"


def _find(entries: Tuple[_Entry, ...], item: Any) -> Optional[_Entry]:
    for e in entries:
        if e.item == item:
            return e
    return None


# -- Interest ---------------------------------------------------------------------------------


class Interest:
    """The channels a client asked for: exact names and patterns.  Immutable.

    ``wants(channel)`` is True if ``channel`` is one of the exact names or matches one of
    the patterns.  An interest with no key (``Interest()``, ``Interest(None)``,
    ``Interest([])``) wants **everything**: that is what a client that declared nothing
    gets.  To change it, build a new one (:meth:`updated`) and replace the old reference;
    ``wants`` is safe to call from any thread.

    :raises TypeError: a key is neither a str nor a :class:`Pattern`.
    """

    __slots__ = ("_keys", "_exact", "_root", "_cache")

    def __init__(self, keys: Optional[Iterable[Key]] = None) -> None:
        if isinstance(keys, (str, Pattern)):
            raise TypeError(f"Interest takes an iterable of keys: write Interest([{keys!r}])")
        frozen = frozenset(keys) if keys is not None else frozenset()
        exact = set()
        root: Optional[_Node] = None
        for key in frozen:
            _check_key(key)
            if isinstance(key, Pattern):
                if root is None:
                    root = _Node()
                _trie_insert(root, key.levels, key)  # built once: no path copying
            else:
                exact.add(key)
        self._keys: FrozenSet[Key] = frozen
        self._exact: FrozenSet[str] = frozenset(exact)
        self._root = root
        self._cache: Dict[str, bool] = {}

    @property
    def keys(self) -> FrozenSet[Key]:
        """The declared exact names and patterns."""
        return self._keys

    @property
    def everything(self) -> bool:
        """True if no key was declared: every channel is wanted."""
        return not self._keys

    def wants(self, channel: str) -> bool:
        """True if the client should be sent ``channel``."""
        if not self._keys or channel in self._exact:
            return True
        root = self._root
        if root is None:
            return False
        cache = self._cache
        result = cache.get(channel)
        if result is None:
            result = _trie_any(root, channel.split("/"), 0)
            if len(cache) < CACHE_SIZE:
                cache[channel] = result
        return result

    def updated(self, add: Iterable[Key] = (), remove: Iterable[Key] = ()) -> Interest:
        """A new interest with the keys of ``add`` added and those of ``remove`` removed."""
        return Interest((self._keys | frozenset(add)) - frozenset(remove))

    def to_wire(self) -> List[Dict[str, str]]:
        """The keys as a msgpack-ready list of :func:`to_wire` maps (sorted: stable bytes)."""
        return [to_wire(k) for k in sorted(self._keys, key=_sort_key)]

    @classmethod
    def declared(
        cls,
        keys: Iterable[Key],
        max_keys: int = MAX_INTEREST_KEYS,
        max_bytes: int = MAX_INTEREST_BYTES,
    ) -> Interest:
        """The interest a client declares with ``keys``, checked against the protocol's
        limits before anything is built or sent (a host would close the connection).

        :raises TypeError: ``keys`` is a single key, or a key is neither a str nor a
            :class:`Pattern`.
        :raises ValueError: more than ``max_keys`` distinct keys, or more than
            ``max_bytes`` UTF-8 bytes of names and pattern texts together.
        """
        if isinstance(keys, (str, Pattern)):
            raise TypeError(f"an interest is an iterable of keys: write [{keys!r}]")
        frozen = frozenset(keys)
        for key in frozen:
            _check_key(key)
        if len(frozen) > max_keys:
            raise ValueError(
                f"an interest of {len(frozen)} keys is more than MAX_INTEREST_KEYS={max_keys} "
                "(a protocol limit): cover several channels with one Pattern (e.g. "
                "Pattern('cams/+/frame')) instead of naming each"
            )
        size = sum(_key_bytes(k) for k in frozen)
        if size > max_bytes:
            raise ValueError(
                f"an interest of {size} UTF-8 bytes of names and patterns is more than "
                f"MAX_INTEREST_BYTES={max_bytes} (a protocol limit): use fewer, broader "
                "patterns (e.g. Pattern('cams/#')) or shorter channel names"
            )
        return cls(frozen)

    @classmethod
    def from_wire(
        cls,
        obj: object,
        max_keys: int = MAX_INTEREST_KEYS,
        max_bytes: int = MAX_INTEREST_BYTES,
    ) -> Interest:
        """The interest a peer declared with :meth:`to_wire` (``None`` means everything).

        The limits are checked before the index is built: a peer beyond them costs the
        decoding of its keys, never an index.

        :raises ProtocolError: ``obj`` is not a list of at most ``max_keys`` valid keys of
            at most ``max_bytes`` UTF-8 bytes together (names and pattern texts).
        """
        if obj is None:
            return cls()
        if type(obj) is not list and type(obj) is not tuple:
            raise ProtocolError(f"an interest is a list of keys, not {type(obj).__qualname__}")
        if len(obj) > max_keys:
            raise ProtocolError(
                f"the peer declared an interest of {len(obj)} keys, more than "
                f"MAX_INTEREST_KEYS={max_keys} (a protocol limit, not a setting: the client "
                "must cover its channels with fewer keys, e.g. patterns)"
            )
        keys: List[Key] = []
        size = 0
        for k in obj:
            key = from_wire(k)
            size += _key_bytes(key)
            if size > max_bytes:  # checked key by key: nothing beyond the limit is parsed
                raise ProtocolError(
                    f"the peer declared an interest of more than {max_bytes} UTF-8 bytes of "
                    f"names and patterns (MAX_INTEREST_BYTES={max_bytes}, a protocol limit, "
                    "not a setting: the client must declare fewer or shorter keys, e.g. "
                    "broader patterns)"
                )
            keys.append(key)
        return cls(keys)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Interest):
            return self._keys == other._keys
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._keys)

    def __repr__(self) -> str:
        return f"Interest({sorted(self._keys, key=_sort_key)!r})"


def _key_bytes(key: Key) -> int:
    """UTF-8 bytes of a name or a pattern's text, as counted against
    :data:`MAX_INTEREST_BYTES` (a lone surrogate counts as 3 bytes)."""
    text = key.text if isinstance(key, Pattern) else key
    if text.isascii():
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))


def _sort_key(key: Key) -> Tuple[int, str]:
    return (1, key.text) if isinstance(key, Pattern) else (0, key)


# -- wire -------------------------------------------------------------------------------------


def to_wire(key: Key) -> Dict[str, str]:
    """``{"c": name}`` for an exact name, ``{"p": text}`` for a :class:`Pattern`.

    :raises TypeError: ``key`` is neither.
    """
    if isinstance(key, Pattern):
        return {"p": key.text}
    _check_key(key)
    return {"c": key}


def from_wire(obj: object) -> Key:
    """The key a peer sent as :func:`to_wire` produced it.

    :raises ProtocolError: ``obj`` is not a one-entry map ``{"c": str}`` or ``{"p": str}``,
        the name is too long, or the pattern is malformed.
    """
    if type(obj) is not dict or len(obj) != 1:
        raise ProtocolError(f"a key is a map {{'c': name}} or {{'p': pattern}}, got {obj!r:.80}")
    ((tag, text),) = obj.items()
    if type(text) is not str:
        raise ProtocolError(f"a key's name or pattern is a str, got {type(text).__qualname__}")
    if tag == "p":
        try:
            return Pattern(text)
        except ValueError as exc:
            raise ProtocolError(f"malformed pattern from peer: {exc}") from None
    if tag == "c":
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError:
            raise ProtocolError("a channel name from the peer is not valid Unicode") from None
        if size > MAX_CHANNEL_BYTES:
            raise ProtocolError(
                f"a channel name of {size} UTF-8 bytes; the limit is {MAX_CHANNEL_BYTES}"
            )
        return text
    raise ProtocolError(f"unknown key tag {tag!r:.40}: expected 'c' (exact) or 'p' (pattern)")
