"""An ASGI app served for a test: uvicorn on a free local port, in a background thread."""

import contextlib
import socket
import threading
import time

import uvicorn


@contextlib.contextmanager
def serving(api):
    """Run `api` with uvicorn on a free port in a background thread; yields the /v1 base URL."""
    sock = socket.socket()
    # Handed a socket, uvicorn's connections do not get TCP_NODELAY (with host and port they do):
    # each answer would then wait ~40 ms for the client's delayed ACK. Connections inherit it.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(api, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
