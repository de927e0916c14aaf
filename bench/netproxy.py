"""A TCP proxy on loopback that tests put between a client and a real server to
make network faults: every byte really crosses sockets, only the proxy decides
what arrives.

Modes (`Proxy.mode`, switchable at any time):

* ``"pass"``: both directions forwarded;
* ``"drop_replies"``: requests still reach the server, replies are thrown away
  (the client's call times out after the server acted on it: a lost reply);
* ``"blackhole"``: nothing is forwarded either way and new connections are
  accepted but never served (a partition that drops packets: calls hang until
  their timeouts).

Use as a context manager; ``url_for(url)`` rewrites a ``redis://`` URL to go
through the proxy.
"""

from __future__ import annotations

import select
import socket
import threading
from urllib.parse import urlsplit, urlunsplit


class Proxy:
    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.mode = "pass"
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self.dropped_bytes = 0
        self._spawn(self._accept)

    def url_for(self, url: str) -> str:
        parts = urlsplit(url)
        netloc = parts.netloc.rsplit("@", 1)
        host = f"127.0.0.1:{self.port}"
        netloc = f"{netloc[0]}@{host}" if len(netloc) == 2 else host
        return urlunsplit(parts._replace(netloc=netloc))

    def _spawn(self, fn, *args) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        self._listener.settimeout(0.1)
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, server]
            self._spawn(self._pipe, client, server)

    def _pipe(self, client: socket.socket, server: socket.socket) -> None:
        socks = [client, server]
        try:
            while not self._stop.is_set():
                if self.mode == "blackhole":  # leave the bytes in the kernel buffers
                    self._stop.wait(0.05)
                    continue
                readable, _, _ = select.select(socks, [], [], 0.05)
                for s in readable:
                    data = s.recv(65536)
                    if not data:
                        return
                    if s is client:
                        server.sendall(data)
                    elif self.mode == "drop_replies":
                        self.dropped_bytes += len(data)
                    else:
                        client.sendall(data)
        except OSError:
            return
        finally:
            for s in socks:
                s.close()

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        with self._lock:
            for s in self._sockets:
                try:
                    s.close()
                except OSError:
                    pass
        for t in self._threads:
            t.join(timeout=2)

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
