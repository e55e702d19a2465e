"""A loopback TCP relay in front of the object store that sees every S3 request.

It counts requests by method and path and the bytes the store sends back, so a test
can say what a ``dvc pull`` transferred, and it can run a hook when a request starts,
so a test can kill the store in the middle of a ``dvc push`` at a chosen request
instead of racing a timer. Hand-written: a counting relay is ~60 lines, and no proxy
library on PyPI does both without its own server to configure.
"""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Callable
from types import TracebackType

REQUEST_LINE = re.compile(rb"(?:^|\r\n)(GET|PUT|HEAD|POST|DELETE) (\S+) HTTP/1\.[01]\r\n")
TAIL = 512  # longer than any request line we need to see whole across two reads


class CountingProxy:
    def __init__(self, upstream_port: int, on_request: Callable[[str, str], None] | None = None) -> None:
        self.upstream_port = upstream_port
        self.on_request = on_request
        self.requests: list[tuple[str, str]] = []
        self.bytes_down = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = False

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.bytes_down = 0

    def object_requests(self, method: str, marker: str = "/files/md5/") -> list[str]:
        """Paths of ``method`` requests for DVC cache objects (not listings or bucket checks)."""
        with self._lock:
            return [path for verb, path in self.requests if verb == method and marker in path]

    def __enter__(self) -> CountingProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self._closed = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
            except OSError:  # store down: the client sees a closed connection, as with no server
                client.close()
                continue
            upstream.settimeout(None)
            threading.Thread(target=self._pump_up, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump_down, args=(upstream, client), daemon=True).start()

    def _relay(self, source: socket.socket, dest: socket.socket, observe: Callable[[bytes], None]) -> None:
        """Copy ``source`` to ``dest``, showing each chunk to ``observe`` first; close both at the end."""
        try:
            while chunk := source.recv(65536):
                observe(chunk)
                dest.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, dest):
                _shutdown(sock)

    def _pump_up(self, client: socket.socket, upstream: socket.socket) -> None:
        carry = b""

        def record_requests(chunk: bytes) -> None:
            nonlocal carry
            data = carry + chunk
            end = 0
            for match in REQUEST_LINE.finditer(data):
                method, path = match.group(1).decode(), match.group(2).decode()
                end = match.end()
                with self._lock:
                    self.requests.append((method, path))
                if self.on_request:
                    self.on_request(method, path)
            carry = data[max(end, len(data) - TAIL) :]

        self._relay(client, upstream, record_requests)

    def _pump_down(self, upstream: socket.socket, client: socket.socket) -> None:
        def count_bytes(chunk: bytes) -> None:
            with self._lock:
                self.bytes_down += len(chunk)

        self._relay(upstream, client, count_bytes)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
