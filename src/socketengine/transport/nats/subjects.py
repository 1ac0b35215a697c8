"""NATS subject layout for socketengine (sans-I/O).

Every user-chosen string (channel, host name, client id) becomes exactly one subject
*token* through :func:`encode_token`: ASCII letters, digits and ``-`` pass through, every
other UTF-8 byte becomes ``_XX`` (two upper-case hex digits), and the empty string becomes
a lone ``_``.  A token therefore never contains ``.``, ``*``, ``>``, whitespace or control
characters, is never empty, and decodes back to the original string
(:func:`decode_token`): no channel can be a wildcard or span two tokens.

Subjects (``P`` is the prefix, default ``"se"``, itself a valid dotted subject; ``H`` the
encoded host name, ``C`` an encoded client id, ``K`` an encoded channel)::

    P.h.H.in.C        client C -> host H frames (the host subscribes to P.h.H.in.*)
    P.h.H.c.C         host H -> client C frames (per-client inbox)
    P.h.H.b.K         host H -> every client, channel K (one publish, the server fans out;
                      clients subscribe to P.h.H.b.*)
    P.h.H.p.C         client C presence heartbeats and goodbye, to host H
                      (the host subscribes to P.h.H.p.*)
    P.hosts.H         host H announcements (anyone may subscribe to P.hosts.*)
    P.r.C             request inboxes of link C (NATS request/reply replies)
    KV bucket names:  see :func:`bucket_name`
"""

from __future__ import annotations

import hashlib
import re
from typing import NamedTuple, Optional

__all__ = [
    "MAX_NAME_BYTES",
    "DEFAULT_PREFIX",
    "encode_token",
    "decode_token",
    "Subjects",
    "Parsed",
    "bucket_name",
    "check_prefix",
]

#: Longest channel / host / client name, in UTF-8 bytes.
MAX_NAME_BYTES = 256
DEFAULT_PREFIX = "se"
_BUCKET_TOKEN_MAX = 64

_PLAIN = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-")
_ESC = [f"_{b:02X}" for b in range(256)]
_PASS = [chr(b) if b in _PLAIN else _ESC[b] for b in range(256)]
_TOKEN_RE = re.compile(r"(?:[A-Za-z0-9-]|_[0-9A-F]{2})+")
_PREFIX_RE = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")


def encode_token(name: str, what: str = "name") -> str:
    """One NATS subject token for ``name`` (reversible; see the module docstring).

    Raises ``TypeError`` for a non-str and ``ValueError`` beyond
    :data:`MAX_NAME_BYTES` UTF-8 bytes (``what`` names the thing in the message).
    """
    if type(name) is not str:
        raise TypeError(f"a {what} is a str, not {type(name).__qualname__}: got {name!r}")
    raw = name.encode("utf-8")
    if len(raw) > MAX_NAME_BYTES:
        raise ValueError(
            f"{what} {name[:40]!r}... is {len(raw)} UTF-8 bytes; the NATS transport accepts "
            f"at most {MAX_NAME_BYTES}: use a shorter {what}"
        )
    if not raw:
        return "_"
    if raw.isascii() and raw.isalnum():
        return name  # the common case: plain ASCII letters and digits
    return "".join([_PASS[b] for b in raw])


def decode_token(token: str) -> str:
    """Inverse of :func:`encode_token`.  Raises ``ValueError`` for a token it cannot produce."""
    if token == "_":
        return ""
    if not _TOKEN_RE.fullmatch(token):
        raise ValueError(f"not a socketengine subject token: {token[:80]!r}")
    if "_" not in token:
        return token
    out = bytearray()
    i = 0
    n = len(token)
    while i < n:
        c = token[i]
        if c == "_":
            b = int(token[i + 1 : i + 3], 16)
            if b in _PLAIN:
                raise ValueError(f"not a canonical token (escaped {chr(b)!r}): {token[:80]!r}")
            out.append(b)
            i += 3
        else:
            out.append(ord(c))
            i += 1
    try:
        name = out.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"token does not decode to UTF-8: {token[:80]!r}") from None
    if len(out) > MAX_NAME_BYTES:
        raise ValueError(f"token decodes to more than {MAX_NAME_BYTES} bytes")
    return name


def check_prefix(prefix: str) -> str:
    """Validate a subject prefix: dot-separated tokens of ``[A-Za-z0-9_-]``."""
    if type(prefix) is not str or not _PREFIX_RE.fullmatch(prefix):
        raise ValueError(
            f"subject prefix {prefix!r} must be dot-separated tokens of letters, digits, "
            "'_' and '-' (no wildcards, spaces or empty tokens)"
        )
    return prefix


def bucket_name(prefix: str, kind: str, host: Optional[str] = None) -> str:
    """A JetStream bucket name (``[A-Za-z0-9_-]`` only) for ``kind`` and optional host.

    ``se`` + ``retained`` + host ``cam`` -> ``se_retained_cam``.  Distinct (prefix, kind,
    host) triples give distinct names because tokens never contain ``.``, which is
    mapped to ``__`` here (a token has no ``__`` since ``_`` always precedes hex).  A host
    token longer than 64 characters is shortened to its first 32 characters plus 24 hex
    digits of its SHA-256 (bucket names become directory names on the servers).
    """
    parts = [check_prefix(prefix).replace(".", "__"), kind]
    if host is not None:
        tok = encode_token(host, "host name")
        if len(tok) > _BUCKET_TOKEN_MAX:
            # Store directories are named after buckets: keep the name short (a hash).
            digest = hashlib.sha256(tok.encode("ascii")).hexdigest()[:24]
            tok = f"{tok[:32]}-{digest}"
        parts.append(tok)
    return "_".join(parts)


class Parsed(NamedTuple):
    """What :meth:`Subjects.parse` found in a subject."""

    kind: str  # "in", "c", "b", "p", "hosts"
    host: str
    name: str  # client id ("in", "c", "p"), channel ("b"), "" for "hosts"


class Subjects:
    """Subject builder for one prefix (cache-friendly: encodings are memoised)."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = check_prefix(prefix)
        self._depth = prefix.count(".") + 1
        self._cache: dict = {}

    def _tok(self, name: str, what: str) -> str:
        tok = self._cache.get(name)
        if tok is None:
            tok = encode_token(name, what)
            if len(self._cache) < 4096:
                self._cache[name] = tok
        return tok

    def _host(self, host: str) -> str:
        return f"{self.prefix}.h.{self._tok(host, 'host name')}"

    def host_inbox(self, host: str, client: str) -> str:
        """Frames from ``client`` to ``host``."""
        return f"{self._host(host)}.in.{self._tok(client, 'client id')}"

    def host_inbox_all(self, host: str) -> str:
        """What the host subscribes to for its inbox (one wildcard token)."""
        return f"{self._host(host)}.in.*"

    def host_open(self, host: str) -> str:
        """Requests answered by ``host`` once it takes sessions (a client's gateway asks
        before a session's first unit: an answer proves the host's subscriptions reach
        the client's server)."""
        return f"{self._host(host)}.o"

    def client_inbox(self, host: str, client: str) -> str:
        """Frames from ``host`` to one ``client``."""
        return f"{self._host(host)}.c.{self._tok(client, 'client id')}"

    def broadcast(self, host: str, channel: str) -> str:
        """Frames from ``host`` to every client on ``channel``."""
        return f"{self._host(host)}.b.{self._tok(channel, 'channel name')}"

    def broadcast_all(self, host: str) -> str:
        """What a client subscribes to for every broadcast channel of ``host``."""
        return f"{self._host(host)}.b.*"

    def presence(self, host: str, client: str) -> str:
        """Heartbeats and goodbye of ``client`` to ``host``."""
        return f"{self._host(host)}.p.{self._tok(client, 'client id')}"

    def presence_all(self, host: str) -> str:
        return f"{self._host(host)}.p.*"

    def host_announce(self, host: str) -> str:
        """Announcements of ``host``."""
        return f"{self.prefix}.hosts.{self._tok(host, 'host name')}"

    def host_announce_all(self) -> str:
        return f"{self.prefix}.hosts.*"

    def reply_prefix(self, link_id: str) -> str:
        """Inbox prefix for NATS request/reply answers to link ``link_id``."""
        return f"{self.prefix}.r.{self._tok(link_id, 'link id')}"

    def parse(self, subject: str) -> Parsed:
        """Split a subject built by this object.  Raises ``ValueError`` otherwise."""
        parts = subject.split(".")
        d = self._depth
        if ".".join(parts[:d]) != self.prefix:
            raise ValueError(f"subject {subject[:80]!r} does not start with {self.prefix!r}")
        rest = parts[d:]
        if len(rest) == 2 and rest[0] == "hosts":
            return Parsed("hosts", decode_token(rest[1]), "")
        if len(rest) == 4 and rest[0] == "h" and rest[2] in ("in", "c", "b", "p"):
            return Parsed(rest[2], decode_token(rest[1]), decode_token(rest[3]))
        raise ValueError(f"not a socketengine subject: {subject[:80]!r}")
