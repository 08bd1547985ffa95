"""What keeps the server up under bad and hostile clients: bounded and strictly parsed bodies,
one-line JSON errors that never echo the input, trusted Host names, deadlines for slow clients,
and uvicorn's settings."""
from __future__ import annotations

import asyncio
import json
import math
import socket
from collections.abc import Sequence

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from mtbert.core.errors import ConfigError

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")  # trusted Host headers unless widened (IPv6 in brackets)
WILDCARD_ADDRESSES = ("", "0.0.0.0", "::")
MAX_DETAIL_CHARS = 500  # an error's "detail" (never a client's whole input echoed back)
MAX_ERRORS = 10         # validation errors listed per response


def cap(text: str, limit: int = MAX_DETAIL_CHARS) -> str:
    """`text` short enough for an error response, and encodable (lone surrogates escaped)."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def error_response(status: int, detail: str, headers: dict | None = None, **extra) -> JSONResponse:
    return JSONResponse({"detail": cap(detail), **extra}, status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware: refuse request bodies over `max_bytes` with 413 before they are parsed, and
    bodies that do not arrive within `read_timeout` seconds with 408 (a slow client holds no
    request open for long). The body is read here (at most max_bytes of it) and replayed to the app."""

    def __init__(self, app, max_bytes: int, read_timeout: float = 10.0):
        self.app, self.max_bytes, self.read_timeout = app, max_bytes, read_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        messages, size, deadline = [], 0, loop.time() + self.read_timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except TimeoutError:
                response = error_response(408, f"request body not received within {self.read_timeout:g} s",
                                          headers={"connection": "close"})
                return await response(scope, receive, send)
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                response = error_response(413, f"request body over {self.max_bytes} bytes")
                return await response(scope, receive, send)
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        pending = iter(messages)

        async def replay():
            return next(pending, None) or await receive()

        await self.app(scope, replay, send)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a finite number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


class StrictJSONRequest(Request):
    """A request whose JSON body may hold finite numbers only (Python's json accepts NaN, Infinity
    and 1e999 -> inf), and whose every parse failure (bad UTF-8, a 5,000-digit integer, nesting too
    deep) is a JSON decode error, so it becomes a 422 like any other invalid JSON."""

    async def json(self):
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = json.loads(body, parse_constant=_reject_constant, parse_float=_finite_float)
            except json.JSONDecodeError:
                raise
            except (ValueError, RecursionError) as e:  # (UnicodeDecodeError is a ValueError)
                raise json.JSONDecodeError(str(e) if not isinstance(e, RecursionError) else "nested too deeply",
                                           "", 0) from None
        return self._json


class StrictJSONRoute(APIRoute):
    def get_route_handler(self):
        handler = super().get_route_handler()

        async def strict(request: Request):
            kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if request.method == "POST" and kind and not (kind == "application/json" or kind.endswith("+json")):
                # (else the body would be validated as if it were JSON and fail with a misleading 422)
                return error_response(415, f"request body must be JSON (Content-Type: application/json), got {cap(kind, 64)}")
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict


def validation_message(errors: list[dict]) -> str:
    """One readable line from pydantic errors, e.g. "texts[1]: Input should be a valid string"."""
    parts = []
    for err in errors:
        if err.get("type") == "json_invalid":
            parts.append(f"request body is not valid JSON ({err.get('ctx', {}).get('error', 'decode error')})")
            continue
        loc = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in err.get("loc", ()) if x != "body")
        parts.append(f"{loc.lstrip('.') or 'body'}: {err.get('msg')}")
    return "; ".join(parts)


def short_errors(errors: list[dict]) -> list[dict]:
    """Pydantic's errors without the offending input (it may be megabytes, bytes or NaN): where,
    what and which kind, each part capped."""
    short = []
    for err in errors[:MAX_ERRORS]:
        item = {"loc": [x if isinstance(x, int) else cap(str(x), 64) for x in err.get("loc", ())],
                "msg": cap(str(err.get("msg", "")), 200), "type": str(err.get("type", ""))}
        if "error" in (err.get("ctx") or {}):  # (why the JSON did not parse)
            item["ctx"] = {"error": cap(str(err["ctx"]["error"]), 200)}
        short.append(item)
    return short


def trusted_hosts(host: str, extra: Sequence[str] = ()) -> list[str]:
    """The Host header names to answer: the loopback names, the address served on (unless it is a
    wildcard: then clients on other machines name the server, and those names must be in `extra`),
    and `extra` (names, comma-separated lists, '*.example.com', or '*' for any)."""
    def literal(name: str) -> str:  # a Host header writes an IPv6 address in brackets
        return f"[{name}]" if ":" in name and not name.startswith("[") else name

    hosts = list(LOOPBACK_HOSTS) + ([literal(host)] if host not in WILDCARD_ADDRESSES else [])
    for part in (p.strip() for name in extra for p in str(name).split(",")):
        if part and ("*" in part[1:] or (part.startswith("*") and part != "*" and not part.startswith("*."))):
            raise ConfigError(f"allowed host {part!r}: a wildcard must be '*' or like '*.example.com'")
        if part == "*":
            return ["*"]
        if part:
            hosts.append(literal(part))
    return list(dict.fromkeys(hosts))


def read_deadline_protocol(read_timeout: float) -> type:
    """uvicorn's HTTP protocol, closing a connection that has not sent a complete request head within
    `read_timeout` seconds of connecting or of its last response. (uvicorn's keep-alive timer
    restarts on every byte received, so a client sending its head a byte at a time would hold the
    connection for ever; the body has BodyLimit's deadline.)"""
    class ReadDeadlineProtocol(AutoHTTPProtocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()  # a complete head: the request is the app's now

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(read_timeout, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()

    return ReadDeadlineProtocol


def server_config(app: FastAPI, *, read_timeout: float = 10.0, keep_alive_timeout: float = 5.0,
                  max_connections: int = 100, log_level: str = "info"):
    """uvicorn's settings against slow and numerous clients."""
    if not all(math.isfinite(t) and t > 0 for t in (read_timeout, keep_alive_timeout)):
        raise ConfigError("read_timeout and keep_alive_timeout must be positive numbers of seconds")
    if max_connections < 1:
        raise ConfigError(f"max_connections must be at least 1, got {max_connections}")
    return uvicorn.Config(app, http=read_deadline_protocol(read_timeout), timeout_keep_alive=keep_alive_timeout,
                          limit_concurrency=max_connections, log_level=log_level, server_header=False)


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (an OSError, e.g. address in use, before the model loads)."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"port must be 0..65535, got {port}")
    sock = None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        if sock is not None:
            sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock
