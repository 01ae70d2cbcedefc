"""uvicorn settings of `samvit serve`: its HTTP/1.1 protocol (h11) with a header timeout and a cap on open
connections, so slow or idle clients cannot hold the server (the body timeout is the app's Guard)."""
from __future__ import annotations

import json
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol


def _raw_json(status: int, reason: str, detail: str) -> bytes:
    """A whole HTTP/1.1 response that closes the connection, for answers given before any request is parsed."""
    body = json.dumps({"detail": detail}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode()
    return head + body


def protocol_class(service) -> type:
    """An H11Protocol whose connections must deliver each request line and headers within
    service.config.header_timeout_s (then 408 and closed; an idle connection is just closed; one whose last answer
    stopped draining is dropped), and beyond service.config.max_connections open connections a new one gets 503 and
    is closed."""
    config, metrics = service.config, service.metrics

    class SamvitH11Protocol(H11Protocol):
        _header_timer: Any = None
        _unsent: Any = None  # bytes of the last answer not yet taken by the client, at the last timer tick
        _started = False  # a byte of the next request has arrived since the timer was armed

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > config.max_connections:
                metrics.refused_connections.inc()
                transport.write(_raw_json(503, "Service Unavailable", f"this server has {config.max_connections} "
                                          "open connections, its limit; retry later"))
                transport.close()
                return
            self._arm_header_timer()

        def _arm_header_timer(self) -> None:
            self._cancel_header_timer()
            self._unsent, self._started = None, False
            self._header_timer = self.loop.call_later(config.header_timeout_s, self._header_timeout)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timeout(self) -> None:
            self._header_timer = None
            if self.transport.is_closing():
                return
            unsent = self.transport.get_write_buffer_size()
            if unsent:  # the last answer is still being read: wait while it drains, drop a client that stopped
                if self._unsent is None or unsent < self._unsent:
                    self._unsent = unsent
                    self._header_timer = self.loop.call_later(config.header_timeout_s, self._header_timeout)
                    return
                metrics.slow_clients.labels("response").inc()
                self.transport.abort()
                return
            if not self._started:  # an idle connection: closed without a word, as after a keep-alive timeout
                self.transport.close()
                return
            metrics.slow_clients.labels("headers").inc()
            self.transport.write(_raw_json(408, "Request Timeout", "the request line and headers did not arrive "
                                           f"within {config.header_timeout_s:g} s (this server's header timeout)"))
            self.transport.close()

        def data_received(self, data: bytes) -> None:
            self._started = True
            super().data_received(data)

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a request's headers arrived: its body has the app's body timeout
                self._cancel_header_timer()
                self.cycle.scope["samvit.abort"] = self.transport.abort  # for the app's send timeout

        def on_response_complete(self) -> None:
            if not self.transport.is_closing():
                self._arm_header_timer()  # the next request on this connection (keep-alive) has the same limit
            super().on_response_complete()

        def connection_lost(self, exc) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

    return SamvitH11Protocol


def uvicorn_config(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", **kwargs):
    """uvicorn.Config for an app from create_app: its protocol and limits (ServeConfig), keep-alive 30 s."""
    import uvicorn

    service = app.state.service
    kwargs.setdefault("timeout_keep_alive", 30)
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=protocol_class(service),
                          limit_concurrency=None, **kwargs)
