"""Small networking helpers shared by the throwaway servers."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free a moment ago.

    For servers we cannot hand a listening socket to (redis-server, a CLI in
    another process) the only option is to ask the kernel for an ephemeral
    port and release it. Another process may grab it in between; callers that
    care retry on "address already in use" rather than trusting this blindly.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port
