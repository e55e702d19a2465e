"""A loopback HTTP server for the fixture tree: Range requests, latency, injected faults.

Hand-written over ``http.server`` because ``python -m http.server`` ignores Range and
offers no fault injection; tests need both to exercise resume and retry paths.
Binds to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import threading
import time
from collections import Counter, defaultdict, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


class FixtureServer:
    """Serve ``root`` on ``http://127.0.0.1:<port>``; use as a context manager.

    ``inject(path, "status:404", "drop:1000", "stall:1000", "trickle:1:2", "redirect:<url>", "empty", "html")``
    queues faults for the next requests of ``path``: an HTTP status; a response that promises
    the full body and closes the connection after N bytes; one that sends N bytes and hangs;
    one that sends N bytes every S seconds (a trickle no per-read timeout catches); a 302 to
    ``url``; a 200 with no body; a 200 with an HTML page (a proxy's or CDN's error page).
    ``latency_s`` delays every response. ``host`` may be another loopback address (127.0.0.2)
    to play a second host.
    """

    def __init__(self, root: Path, *, port: int = 0, latency_s: float = 0.0, host: str = "127.0.0.1") -> None:
        self.root = Path(root).resolve()
        self.latency_s = latency_s
        self.faults: dict[str, deque[str]] = defaultdict(deque)
        self.hits: Counter[str] = Counter()
        self.ranges: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self.stalled = threading.Event()  # set on exit to release stalled responses
        self.host = host
        self.httpd = ThreadingHTTPServer((host, port), self._handler())
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.httpd.server_address[1]}"

    def inject(self, path: str, *faults: str) -> None:
        with self._lock:
            self.faults["/" + path.lstrip("/")].extend(faults)

    def __enter__(self) -> FixtureServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stalled.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def _next_fault(self, path: str) -> str:
        with self._lock:
            self.hits[path] += 1
            queue = self.faults.get(path)
            return queue.popleft() if queue else ""

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, so clients can reuse connections
            disable_nagle_algorithm = True  # else headers + body trip the 40 ms delayed-ACK stall

            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

            def do_GET(self) -> None:
                path = unquote(urlsplit(self.path).path)
                fault = server._next_fault(path)
                if server.latency_s:
                    time.sleep(server.latency_s)
                if fault.startswith("status:"):
                    self._send_status(int(fault.split(":")[1]))
                    return
                if fault in ("empty", "html"):
                    body = b"<!DOCTYPE html><html><body>Service busy, try later</body></html>" if fault == "html" else b""
                    self.send_response(200)
                    if body:
                        self.send_header("Content-Type", "text/html; charset=utf-8")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if fault.startswith("redirect:"):
                    self.send_response(302)
                    self.send_header("Location", fault.removeprefix("redirect:"))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                file = (server.root / path.lstrip("/")).resolve()
                if server.root not in file.parents or not file.is_file():
                    self._send_status(404)
                    return
                data = file.read_bytes()
                start, end = 0, len(data) - 1
                header = self.headers.get("Range")
                if header and (match := RANGE.match(header)):
                    with server._lock:
                        server.ranges.append((path, header))
                    start = int(match.group(1))
                    end = int(match.group(2)) if match.group(2) else end
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start : end + 1]
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if fault.startswith("stall:"):  # send N bytes, then hang until the client dies
                    self.wfile.write(body[: int(fault.split(":")[1])])
                    self.wfile.flush()
                    server.stalled.wait(60)
                    self.close_connection = True
                    return
                if fault.startswith("trickle:"):  # N bytes every S seconds until done or the client goes
                    _, size, seconds = fault.split(":")
                    with contextlib.suppress(OSError):
                        for offset in range(0, len(body), int(size)):
                            self.wfile.write(body[offset : offset + int(size)])
                            self.wfile.flush()
                            if server.stalled.wait(float(seconds)):
                                break
                    self.close_connection = True
                    return
                if fault.startswith("drop:"):
                    self.wfile.write(body[: int(fault.split(":")[1])])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def _send_status(self, status: int) -> None:
                body = f"<Error><Code>{status}</Code></Error>".encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve a fixture tree on 127.0.0.1")
    parser.add_argument("root", type=Path)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--url-file", type=Path, help="write the base URL here once listening")
    args = parser.parse_args()
    with FixtureServer(args.root, port=args.port, latency_s=args.latency_ms / 1000) as server:
        print(server.url, flush=True)
        if args.url_file:
            args.url_file.write_text(server.url + "\n")
        threading.Event().wait()


if __name__ == "__main__":
    main()
