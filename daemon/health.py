"""/healthz, /readyz and Prometheus /metrics on --healthz-ip:--healthz-port (flannel's mustRunHealthz).

A small HTTP/1.0 responder on asyncio streams: three fixed paths, any method, no keep-alive; pulling in an HTTP
framework for this would be most of the daemon's dependency weight.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable

from daemon.errors import FlannelError

Metrics = Callable[[], dict[str, float]]
Problem = Callable[[], "str | None"]  # what is wrong, or None


class Health:
    def __init__(self, metrics: Metrics, unhealthy: Problem, unready: Problem) -> None:
        self.ready = False
        self._metrics = metrics
        self._unhealthy = unhealthy
        self._unready = unready

    async def serve(self, host: str, port: int) -> asyncio.Server:
        try:
            return await asyncio.start_server(self._handle, host, port)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise FlannelError(f"healthz port {host}:{port} is already in use") from None
            raise FlannelError(f"cannot serve healthz on {host}:{port}: {exc.strerror}") from None

    def _respond(self, path: str) -> tuple[int, str, str]:
        if path == "/healthz":
            problem = self._unhealthy()
            return (500, "text/plain", f"{problem}\n") if problem else (200, "text/plain", "flanneld is running\n")
        if path == "/readyz":
            problem = self._unready()
            return (503, "text/plain", f"{problem}\n") if problem else (200, "text/plain", "flanneld is ready\n")
        if path == "/metrics":
            return 200, "text/plain; version=0.0.4", render(self._metrics())
        return 404, "text/plain", "not found\n"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            parts = request.decode("latin-1").split()
            status, kind, body = self._respond(parts[1].split("?")[0] if len(parts) >= 2 else "")
            reason = {200: "OK", 404: "Not Found", 500: "Internal Server Error", 503: "Service Unavailable"}[status]
            data = body.encode()
            writer.write(f"HTTP/1.0 {status} {reason}\r\nContent-Type: {kind}\r\nContent-Length: {len(data)}\r\n"
                         f"Connection: close\r\n\r\n".encode() + data)
            await writer.drain()
        except (TimeoutError, ConnectionError, ValueError):  # slow, gone, or a line past the reader's limit
            pass
        finally:
            writer.close()


def render(samples: dict[str, float]) -> str:
    """Prometheus text format from {"name{labels}": value}: samples grouped per metric under one TYPE line."""
    families: dict[str, list[str]] = {}
    for key, value in samples.items():
        families.setdefault(key.split("{", 1)[0], []).append(f"{key} {value:g}")
    lines = []
    for name, family in families.items():
        lines.append(f"# TYPE {name} {'counter' if name.endswith('_total') else 'gauge'}")
        lines += family
    return "\n".join(lines) + "\n"
