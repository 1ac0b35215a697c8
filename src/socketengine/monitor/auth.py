"""Who may see the monitor: the token, the login cookie, and the ``Host:`` check."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import time
from typing import Optional

from .http import Request

__all__ = ["COOKIE_MAX_AGE", "Gate", "is_loopback"]

#: Seconds a login cookie is valid (the browser drops it then, and the monitor refuses it).
COOKIE_MAX_AGE = 12 * 3600

_COOKIE = "socketengine_monitor"
_COOKIE_LABEL = b"socketengine monitor cookie v2 "
_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


def is_loopback(addr: str) -> bool:
    """Whether ``addr`` is a loopback address or name."""
    if addr in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


class Gate:
    """Checks a request's credentials and ``Host:`` header.

    A browser presents the token once (the page's form, or ``?token=``) and then
    holds a cookie ``EXPIRY.MAC``: MAC = HMAC-SHA256(token, label + EXPIRY), so the
    token is never stored and a cookie stops working after ``max_age`` seconds.
    Scripts send ``Authorization: Bearer TOKEN``.  Every comparison is
    :func:`hmac.compare_digest`.
    """

    def __init__(
        self,
        token: Optional[bytes],
        addr: str,
        secure: bool,
        max_age: int = COOKIE_MAX_AGE,
    ) -> None:
        self.token = token
        self.addr = addr
        self.secure = secure
        self.max_age = int(max_age)
        self.loopback_only = is_loopback(addr)

    def _mac(self, expiry: int) -> str:
        assert self.token is not None
        message = _COOKIE_LABEL + str(expiry).encode()
        return hmac.new(self.token, message, hashlib.sha256).hexdigest()

    def check_token(self, given: str) -> bool:
        if self.token is None:
            return True
        try:
            candidate = given.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return hmac.compare_digest(candidate, self.token)

    def check_cookie(self, value: str, now: Optional[float] = None) -> bool:
        expiry_text, _, mac = value.partition(".")
        if not expiry_text.isdigit() or len(expiry_text) > 12:
            return False
        expiry = int(expiry_text)
        if expiry < (time.time() if now is None else now):
            return False
        return hmac.compare_digest(mac.encode("latin-1"), self._mac(expiry).encode())

    def cookie_header(self) -> str:
        """A ``Set-Cookie`` value for a browser that just presented the token."""
        expiry = int(time.time()) + self.max_age
        parts = [
            f"{_COOKIE}={expiry}.{self._mac(expiry)}",
            "Path=/",
            f"Max-Age={self.max_age}",
            "HttpOnly",
            "SameSite=Strict",
        ]
        if self.secure:
            parts.append("Secure")
        return "; ".join(parts)

    def authorized(self, request: Request) -> bool:
        """Whether ``request`` carries the token, a valid cookie, or ``Bearer`` token."""
        if self.token is None:
            return True
        auth = request.header("authorization") or ""
        if auth[:7].lower() == "bearer " and self.check_token(auth[7:].strip()):
            return True
        for item in (request.header("cookie", "; ") or "").split(";"):
            name, _, value = item.strip().partition("=")
            if name == _COOKIE and self.check_cookie(value):
                return True
        given = request.arg("token")
        return given is not None and self.check_token(given)

    def host_allowed(self, request: Request) -> bool:
        """Refuse foreign ``Host:`` headers on a loopback monitor (DNS rebinding)."""
        if not self.loopback_only:
            return True
        value = request.header("host") or ""
        if value.startswith("["):
            name = value[1 : value.find("]")] if "]" in value else value
        else:
            name = value.rsplit(":", 1)[0] if value.count(":") == 1 else value
        return name.lower() in _LOOPBACK_NAMES or name == self.addr
