"""Running the app: bind the socket first (so a busy port is one clear error and port 0 gets a free
port to print), then hand it to uvicorn. `serve_in_thread` runs the same server in a background
thread (tests); `serve_process` runs `diffret serve` as a child process (the browser test, the
load benchmark, the screenshot)."""
from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import threading
from contextlib import contextmanager

import uvicorn

# uvicorn's bounds: connections served at once (more: 503), idle keep-alive seconds
LIMIT_CONCURRENCY = 256
KEEP_ALIVE_S = 5


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); OSError as a one-line ValueError (e.g. the port is busy)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ValueError(f"--host {host}: {e.strerror or e}") from None
    family, kind, proto, _, addr = infos[0]
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say so, and without it a
    # keep-alive response (head, then body) waits ~40 ms for the client's delayed ACK
    sock = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(256)
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def make_server(app, log_level: str = "warning") -> uvicorn.Server:
    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="off", http="h11",
                            limit_concurrency=LIMIT_CONCURRENCY, timeout_keep_alive=KEEP_ALIVE_S, server_header=False)
    return uvicorn.Server(config)


def serve(app, sock: socket.socket) -> None:
    """Serve `app` on the bound `sock` until Ctrl-C (or SIGTERM)."""
    make_server(app).run(sockets=[sock])


@contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0):
    """Yields the base URL of `app` served from a background thread; stops the server on exit."""
    sock = bind(host, port)
    server = make_server(app)
    server.install_signal_handlers = lambda: None  # not the main thread
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the server did not start")
            threading.Event().wait(0.02)
        yield url_of(sock)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@contextmanager
def serve_process(caches: list, generator=None, extra: tuple = (), timeout: float = 300.0, log=None, procs=None):
    """`diffret serve` on a free loopback port in a child process; yields its base URL. Its stderr
    goes to the file `log` (default: discarded unless the start fails); `procs` (a list) gets the process."""
    cmd = [sys.executable, "-m", "diffret.pipeline.cli", "serve", "--port", "0"]
    for c in caches:
        cmd += ["--cache", str(c)]
    if generator:
        cmd += ["--generator", str(generator)]
    err = open(log, "w+") if log else tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd + [str(x) for x in extra], stdout=subprocess.PIPE, stderr=err, text=True)
    if procs is not None:
        procs.append(proc)
    try:
        first: list[str] = []
        reader = threading.Thread(target=lambda: first.append(proc.stdout.readline()), daemon=True)
        reader.start()  # "serving N videos ... at http://127.0.0.1:PORT/"
        reader.join(timeout)
        line = first[0] if first else ""
        if "http://" not in line:
            proc.kill()
            proc.wait()
            err.seek(0)
            raise RuntimeError(f"diffret serve did not start: {line}{err.read()[-2000:]}")
        yield line.rsplit(" at ", 1)[1].strip()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        err.close()
