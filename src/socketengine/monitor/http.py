"""HTTP/1.1 for the monitor: h11 (sans-I/O) parses and frames, this module does the I/O.

Each request is parsed by a fresh :class:`h11.Connection` fed from this module's own
buffer, so the few rules h11 leaves to the application are enforced before h11 sees
the bytes or right after: obsolete line folding (``obs-fold``) is refused rather than
unfolded, only HTTP/1.0 and 1.1 are served (505 otherwise), a request with both
``Transfer-Encoding`` and ``Content-Length`` or with two ``Host`` headers is refused,
and heads and bodies are bounded.  h11 refuses the rest: malformed request lines and
header lines (a space before the colon), bad or conflicting ``Content-Length``
values, a missing ``Host`` on HTTP/1.1, a transfer coding other than chunked (501).
Every refusal is an :class:`HTTPError` that the server answers (4xx, 501, 505) and
logs at DEBUG, never higher.
"""

from __future__ import annotations

import asyncio
import http
import re
from typing import Dict, List, Optional, Tuple, Union
from urllib.parse import parse_qs, urlsplit

try:
    import h11
except ImportError:  # pragma: no cover - the monitor extra
    raise ImportError(
        "the browser monitor needs h11: pip install 'socket.engine[monitor]'"
    ) from None

__all__ = [
    "MAX_BODY",
    "MAX_HEAD",
    "MAX_QUERY_FIELDS",
    "WRITE_TIMEOUT",
    "HTTPConnection",
    "HTTPError",
    "Request",
]

#: Largest request head (request line and headers), bytes; more is answered 431.
MAX_HEAD = 16 * 1024
#: Largest request body (only ``POST /login`` has one), bytes; more is answered 413.
MAX_BODY = 4096
#: Most fields in a query string or a form body; more is answered 400.
MAX_QUERY_FIELDS = 16
#: Seconds a response may take to drain to a browser before the connection is dropped.
WRITE_TIMEOUT = 10.0

#: Headers on every response.
BASE_HEADERS = (
    ("Server", "socketengine-monitor"),
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
)

_HEAD_END = re.compile(rb"\n\r?\n")  # as h11 finds it: CRLF CRLF, or bare LFs
_OBS_FOLD = re.compile(rb"\n[ \t]")  # a header line continued on the next line
_READ_SIZE = 65536

Headers = Union[Dict[str, str], List[Tuple[str, str]]]


class HTTPError(Exception):
    """A request this server refuses; ``status`` is the answer (400, 413, 431, 505...)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Request:
    """One parsed request: method, path, query, headers (names lower-case), body."""

    __slots__ = ("method", "path", "query", "headers", "body")

    def __init__(
        self,
        method: str,
        path: str,
        query: Dict[str, List[str]],
        headers: List[Tuple[str, str]],
        body: bytes,
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body

    def header(self, name: str, joiner: str = ", ") -> Optional[str]:
        """The value of header ``name`` (lower-case); repeated headers joined."""
        values = [v for k, v in self.headers if k == name]
        return joiner.join(values) if values else None

    def arg(self, name: str) -> Optional[str]:
        """The first value of query field ``name``, or None."""
        values = self.query.get(name)
        return values[0] if values else None

    def form(self) -> Dict[str, List[str]]:
        """The body as an ``application/x-www-form-urlencoded`` form."""
        return parse_fields(self.body.decode("utf-8", "replace"))


def parse_fields(text: str) -> Dict[str, List[str]]:
    """A query string or form; more than :data:`MAX_QUERY_FIELDS` fields is a 400."""
    try:
        return parse_qs(text, max_num_fields=MAX_QUERY_FIELDS)
    except ValueError:
        raise HTTPError(400, f"more than {MAX_QUERY_FIELDS} query fields") from None


def _text(data: bytes) -> str:
    return data.decode("latin-1")


class HTTPConnection:
    """One browser connection: reads requests, writes responses and event streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._buf = bytearray()
        self._h11: Optional[h11.Connection] = None

    # -- reading ----------------------------------------------------------------------

    async def read_request(self) -> Optional[Request]:
        """The next request; None when the browser closed the connection between two.

        Raises :class:`HTTPError` for a request to refuse (then answer it with
        :meth:`refuse` and close).
        """
        conn = self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        head_end = await self._read_head()
        if head_end is None:
            return None
        if _OBS_FOLD.search(self._buf, 0, head_end):
            raise HTTPError(400, "obsolete line folding in the request head")
        conn.receive_data(bytes(self._buf))
        self._buf.clear()
        event = self._next_event(conn)
        if not isinstance(event, h11.Request):
            raise HTTPError(400, "incomplete request head")
        if event.http_version not in (b"1.0", b"1.1"):
            raise HTTPError(505, f"HTTP/{_text(event.http_version)} is not supported")
        headers = [(_text(k), _text(v)) for k, v in event.headers]
        names = [k for k, _ in headers]
        if names.count("host") > 1:
            raise HTTPError(400, "more than one Host header")
        if "transfer-encoding" in names and "content-length" in names:
            raise HTTPError(400, "both Transfer-Encoding and Content-Length")
        for name, value in headers:
            if name == "content-length" and int(value) > MAX_BODY:
                raise HTTPError(413, "request body too large")
        body = await self._read_body(conn)
        url = urlsplit(_text(event.target))
        return Request(_text(event.method), url.path or "/", parse_fields(url.query), headers, body)

    async def _read_head(self) -> Optional[int]:
        """Buffer one request head; return where it ends, or None on a clean EOF."""
        while True:
            while self._buf[:1] in (b"\r", b"\n"):  # blank lines before a request
                del self._buf[:1]
            found = _HEAD_END.search(self._buf)
            if found is not None:
                if found.end() > MAX_HEAD:
                    raise HTTPError(431, "request head too large")
                return found.end()
            if len(self._buf) > MAX_HEAD:
                raise HTTPError(431, "request head too large")
            data = await self._reader.read(_READ_SIZE)
            if not data:
                if self._buf:
                    raise HTTPError(400, "incomplete request head")
                return None
            self._buf += data

    async def _read_body(self, conn: h11.Connection) -> bytes:
        body = bytearray()
        while True:
            event = self._next_event(conn)
            if event is h11.NEED_DATA:
                conn.receive_data(await self._reader.read(_READ_SIZE))  # b"": EOF
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY:
                    raise HTTPError(413, "request body too large")
            elif isinstance(event, h11.EndOfMessage):
                self._buf += conn.trailing_data[0]  # the next request, if pipelined
                return bytes(body)
            else:
                raise HTTPError(400, "incomplete request body")

    @staticmethod
    def _next_event(conn: h11.Connection) -> object:
        try:
            return conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise HTTPError(exc.error_status_hint, str(exc)) from None

    # -- writing ----------------------------------------------------------------------

    def _response(self, status: int, headers: Headers, close: bool) -> None:
        assert self._h11 is not None
        items = list(BASE_HEADERS)
        items.extend(headers.items() if isinstance(headers, dict) else headers)
        if close:
            items.append(("Connection", "close"))
        phrase = http.HTTPStatus(status).phrase.encode("ascii")
        self._writer.write(
            self._h11.send(h11.Response(status_code=status, headers=items, reason=phrase))
        )

    async def respond(
        self,
        status: int,
        body: bytes = b"",
        content_type: str = "text/plain; charset=utf-8",
        headers: Optional[Headers] = None,
        head_only: bool = False,
        close: bool = False,
    ) -> bool:
        """Send one whole response; return whether the connection may serve another."""
        conn = self._h11
        assert conn is not None
        items: List[Tuple[str, str]] = [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
        ]
        if headers:
            items.extend(headers.items() if isinstance(headers, dict) else headers)
        self._response(status, items, close)
        if body and not head_only:
            self._writer.write(conn.send(h11.Data(data=body)))
        self._writer.write(conn.send(h11.EndOfMessage()) or b"")
        await self.drain()
        return conn.our_state is h11.DONE and conn.their_state is h11.DONE

    async def refuse(self, error: HTTPError) -> None:
        """Answer a refused request (then the caller closes the connection)."""
        if self._h11 is None or self._h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        await self.respond(error.status, f"{error}\n".encode(), close=True)

    def start_stream(self, headers: Headers) -> None:
        """Start a 200 response of unknown length (an event stream); chunked on 1.1."""
        self._response(200, headers, close=True)

    def stream(self, data: bytes) -> None:
        """Send a piece of the streamed response (call :meth:`drain` after)."""
        assert self._h11 is not None
        self._writer.write(self._h11.send(h11.Data(data=data)))

    def end_stream(self) -> None:
        """End the streamed response (the last chunk on HTTP/1.1)."""
        assert self._h11 is not None
        if self._h11.our_state is h11.SEND_BODY:
            self._writer.write(self._h11.send(h11.EndOfMessage()) or b"")

    async def drain(self) -> None:
        """Wait until the browser took what was written (:data:`WRITE_TIMEOUT` at most)."""
        await asyncio.wait_for(self._writer.drain(), WRITE_TIMEOUT)
