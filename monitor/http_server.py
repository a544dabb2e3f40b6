"""``/metrics``, ``/healthz`` and ``/readyz`` on one port: the daemon's HTTP side.

A thread per request, IPv4 or IPv6, HEAD answered as GET, other methods refused (405); failed requests are logged
as one line, never as socketserver's traceback on stderr.
"""
from __future__ import annotations

import functools
import logging
import math
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from connectors.kafka import error_text
from monitor.logs import fields as _fields

log = logging.getLogger("forewarn.http")


class _RequestErrors:
    """Logs failed HTTP requests: the first of each kind of error a minute as a warning, the
    rest at debug. A client (a port scan, a broken scraper) can repeat a failure hundreds of
    times a second, and the server's request threads share one of these."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}

    def log(self, exc: BaseException, **fields) -> None:
        now, kind = time.monotonic(), type(exc).__name__
        with self._lock:
            first = now - self._last.get(kind, -math.inf) >= 60.0
            if first:
                self._last[kind] = now
        extra = _fields(**fields, error=error_text(exc))
        if first:
            log.warning("HTTP request failed (the same error again within a minute is logged at debug)", extra=extra)
        else:
            log.debug("HTTP request failed", extra=extra)


class _StderrLog:
    """What wsgiref writes to stderr, a traceback when a response could not be sent, as one
    line at each flush: debug where the client stopped reading or went away, else a warning."""

    def __init__(self) -> None:
        self._text: list[str] = []

    def write(self, text: str) -> None:
        self._text.append(text)

    def flush(self) -> None:
        text, self._text = "".join(self._text).strip(), []
        if not text:
            return
        error = text.splitlines()[-1]
        if error.startswith(("TimeoutError", "BrokenPipeError", "ConnectionResetError", "ConnectionAbortedError")):
            log.debug("HTTP response cut short", extra=_fields(error=error))  # the client's doing
        else:
            log.warning("HTTP response failed", extra=_fields(error=error))


class _QuietHandler(WSGIRequestHandler):
    timeout = 10.0  # seconds: a client that stops sending mid-request lets go of its thread

    def log_message(self, *args) -> None:  # scrapes every few seconds are not news
        pass

    def get_stderr(self) -> _StderrLog:  # wsgiref's handler catches write errors itself and prints them
        return _StderrLog()


class _SharedRenders:
    """Scrapes asking for the same thing while it is being rendered wait for that render and
    share its answer.  Rendering the device series takes the GIL from the processing loop
    (~0.2 s for 10,000 devices): scrapers polling at once (duplicate scrape configs, a client
    in a loop) each rendering in full took the loop from 8,600 to 1,900 batches/s at four.
    A scrape arriving when no render runs starts its own: what it reads is never older."""

    def __init__(self, render: Callable) -> None:
        self._render = render
        self._lock = threading.Lock()
        self._running: dict[tuple, tuple[threading.Event, list]] = {}
        self.waiting = 0  # scrapes waiting for another's render now

    def __call__(self, environ, key: tuple) -> tuple[str, list, bytes]:
        with self._lock:
            running = self._running.get(key)
            if running is None:
                running = self._running[key] = (threading.Event(), [])
                leader = True
            else:
                leader = False
                self.waiting += 1
        done, answer = running
        if not leader:
            done.wait()
            with self._lock:
                self.waiting -= 1
            if answer:
                return answer[0]
            return self(environ, key)  # the render it waited for failed: its own, to say why
        try:
            answer.append(self._render(environ))
        finally:
            with self._lock:
                del self._running[key]
            done.set()
        return answer[0]


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    """A thread per request, as prometheus_client's own server: one idle or slow client (a
    port scan, a half-open load-balancer check) must not hold the probes of everyone else.
    Many slow clients, each trickling a byte within the handler's timeout, must not take
    every file descriptor either (new Kafka sockets would fail, and the accept loop spin):
    at most MAX_CONNECTIONS at once, each closed REQUEST_DEADLINE_S after it opened."""

    daemon_threads = True
    MAX_CONNECTIONS = 128
    request_queue_size = MAX_CONNECTIONS  # socketserver's 5 dropped a burst's connections, retried 1 s later
    REQUEST_DEADLINE_S = 15.0

    def __init__(self, *args, errors: _RequestErrors, **kwargs) -> None:
        self.errors = errors
        self._slots = threading.BoundedSemaphore(self.MAX_CONNECTIONS)
        self._lock = threading.Lock()
        self._opened: dict[socket.socket, float] = {}
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):  # turned away at once: the descriptor is back
            self.shutdown_request(request)
            log.debug("HTTP client turned away: too many connections open", extra=_fields(limit=self.MAX_CONNECTIONS))
            return
        with self._lock:
            self._opened[request] = time.monotonic()
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread to release it
            self._done(request)
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._done(request)

    def _done(self, request) -> None:
        with self._lock:
            self._opened.pop(request, None)
        self._slots.release()

    def service_actions(self) -> None:
        """Between polls of serve_forever (every 0.5 s): connections past their deadline are
        shut, which ends their handler's wait."""
        late = time.monotonic() - self.REQUEST_DEADLINE_S
        with self._lock:
            overdue = [r for r, opened in self._opened.items() if opened < late]
        for request in overdue:
            try:
                request.shutdown(socket.SHUT_RDWR)
            except OSError:  # closed meanwhile
                pass

    def handle_error(self, request, client_address) -> None:
        # socketserver's own prints a traceback to stderr, outside the JSON logs, for every
        # client that connects and then sends nothing until the handler's timeout
        exc = sys.exc_info()[1]
        client = client_address[0] if isinstance(client_address, tuple) else str(client_address)
        if isinstance(exc, (TimeoutError, ConnectionError)):  # resets, broken pipes: the client's doing
            log.debug("HTTP client timed out or went away", extra=_fields(client=client, error=error_text(exc)))
        else:
            self.errors.log(exc, client=client)


class _ThreadingServer6(_ThreadingServer):
    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        # "::" then takes IPv4 clients too (as IPv4-mapped addresses), whatever the
        # system's net.ipv6.bindv6only says: probes and scrapers may come over either
        try:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        except (AttributeError, OSError):  # a system without dual-stack sockets: IPv6 alone
            pass
        super().server_bind()


def _server_class(host: str, port: int) -> type[_ThreadingServer]:
    """IPv4 unless the host has only IPv6 addresses ("::", "::1", an AAAA-only name): a name
    with both, "localhost" say, stays on IPv4 as before."""
    if not host:  # WSGIServer's "" is IPv4's any address
        return _ThreadingServer
    families = {info[0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)}
    return _ThreadingServer if socket.AF_INET in families or socket.AF_INET6 not in families else _ThreadingServer6


class MetricsServerError(OSError):
    """The metrics server could not listen where it was told: the address and settings named.

    >>> blocker = socket.socket()
    >>> blocker.bind(("127.0.0.1", 0))
    >>> blocker.listen()
    >>> try:
    ...     HealthServer("127.0.0.1", blocker.getsockname()[1], CollectorRegistry(), lambda: True, lambda: True)
    ... except MetricsServerError as e:
    ...     print(str(e).replace(str(blocker.getsockname()[1]), "PORT"))
    cannot serve metrics on 127.0.0.1:PORT (metrics.host, metrics.port): Address already in use
    >>> blocker.close()
    """


class HealthServer:
    """``/metrics``, ``/healthz`` (the loop turned recently) and ``/readyz`` (partitions
    assigned, initialization loaded) on one port, in a background thread.  ``host`` may be
    IPv4 or IPv6 ("::" serves both); HEAD is answered as GET, without the body.

    >>> from urllib.error import HTTPError
    >>> from urllib.request import ProxyHandler, build_opener
    >>> get = build_opener(ProxyHandler({})).open  # straight to loopback, whatever http_proxy says
    >>> server = HealthServer("127.0.0.1", 0, CollectorRegistry(), healthy=lambda: True, ready=lambda: False)
    >>> server.start()  # port 0: the system picks a free one, read back as server.port
    >>> with get(f"http://127.0.0.1:{server.port}/healthz", timeout=5) as response:
    ...     response.status
    200
    >>> try:
    ...     get(f"http://127.0.0.1:{server.port}/readyz", timeout=5)
    ... except HTTPError as e:
    ...     print(e.code, e.read().decode().strip())
    ...     e.close()
    503 not ok
    >>> server.stop()
    """

    def __init__(self, host: str, port: int, registry: CollectorRegistry,
                 healthy: Callable[[], bool], ready: Callable[[], bool]) -> None:
        metrics_app = make_wsgi_app(registry)
        errors = _RequestErrors()

        def render_metrics(environ) -> tuple[str, list, bytes]:
            answer: list = []
            body = b"".join(metrics_app(environ, lambda status, headers, exc_info=None: answer.extend((status, headers))))
            return answer[0], answer[1], body

        shared_render = self.renders = _SharedRenders(render_metrics)

        def respond(environ, start_response):
            path = environ.get("PATH_INFO", "")
            if path in ("/healthz", "/readyz", "/metrics", "/") and environ.get("REQUEST_METHOD") != "GET":
                # a POST is no probe or scrape, and says so (HEAD came here as GET); one Allow
                # header for every path, where prometheus_client's own omits HEAD
                allowed = [("Allow", "OPTIONS, GET, HEAD")]
                if environ.get("REQUEST_METHOD") == "OPTIONS":
                    start_response("200 OK", allowed)
                    return [b""]
                start_response("405 Method Not Allowed", [("Content-Type", "text/plain"), *allowed])
                return [b"method not allowed: use GET or HEAD\n"]
            if path in ("/healthz", "/readyz"):
                ok = healthy() if path == "/healthz" else ready()
                start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
                return [b"ok\n" if ok else b"not ok\n"]
            if path in ("/metrics", "/"):  # what prometheus_client's answer depends on: the filter, format, gzip
                status, headers, body = shared_render(environ, (environ.get("QUERY_STRING", ""),
                                                                environ.get("HTTP_ACCEPT", ""),
                                                                environ.get("HTTP_ACCEPT_ENCODING", "")))
                start_response(status, list(headers))
                return [body]
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found\n"]

        def app(environ, start_response):
            head = environ.get("REQUEST_METHOD") == "HEAD"
            if head:  # prometheus_client's app refuses HEAD: it is asked for GET, and its body dropped
                environ = {**environ, "REQUEST_METHOD": "GET"}
            answer: list = []

            def keep(status, headers, exc_info=None):  # sent below, once the body is known
                answer[:] = [status, list(headers)]

            try:
                body = b"".join(respond(environ, keep))
            except Exception as exc:  # noqa: BLE001  wsgiref would print a traceback to stderr
                errors.log(exc, path=environ.get("PATH_INFO", ""))
                answer[:] = ["500 Internal Server Error", [("Content-Type", "text/plain")]]
                body = b"internal error\n"
            status, headers = answer
            if head and not any(name.lower() == "content-length" for name, _ in headers):
                headers.append(("Content-Length", str(len(body))))  # what GET sends; wsgiref would say 0
            start_response(status, headers)
            return [] if head else [body]

        host = host.strip("[]")  # "[::1]", as in a URL, is "::1"
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            server_class = functools.partial(_server_class(host, port), errors=errors)  # one log for both
            self.server: WSGIServer = make_server(host, port, app, server_class=server_class,
                                                  handler_class=_QuietHandler)
        except OSError as exc:  # in use, not an address of this machine, a name that does not resolve
            raise MetricsServerError(f"cannot serve metrics on {where} (metrics.host, metrics.port): "
                                     f"{exc.strerror or exc}") from None
        self.port = self.server.server_port
        self.thread = threading.Thread(target=self.server.serve_forever, name="forewarn-http", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        if self.thread.is_alive():  # shutdown() waits for serve_forever, for ever if it never ran
            self.server.shutdown()
        self.server.server_close()
