"""Network cut for tests: any Python process started with this folder on PYTHONPATH (a notebook
kernel, its DataLoader workers) refuses every connection or name lookup that leaves the machine.

Each attempt is appended to $RSNA22_NETWORK_LOG before it is refused, so a library that swallows
the error (albumentations' update check does) still fails the test that reads the log. Loopback
and UNIX sockets stay open: a notebook kernel talks to papermill through them.
"""

from __future__ import annotations

import os
import socket
import sys

LOG = os.environ.get("RSNA22_NETWORK_LOG")
LOCAL_HOSTS = {"", "localhost", "127.0.0.1", "::1", "0.0.0.0"}


def _host(event: str, args: tuple) -> str | None:
    """The host an audited socket call wants to reach (None: not a network call, or a local one)."""
    if event in ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex"):
        host = args[0]
    elif event in ("socket.connect", "socket.sendto"):
        sock, address = args[0], args[-1]
        if getattr(sock, "family", None) == getattr(socket, "AF_UNIX", None) or not isinstance(address, tuple):
            return None
        host = address[0]
    else:
        return None
    host = host.decode() if isinstance(host, bytes) else host
    return None if host is None or str(host) in LOCAL_HOSTS else str(host)


def _refuse(event: str, args: tuple) -> None:
    host = _host(event, args)
    if host is None:
        return
    with open(LOG, "a") as log:
        log.write(f"pid {os.getpid()} {event} {host} ({' '.join(sys.argv)[:120]})\n")
    raise ConnectionRefusedError(f"network cut by the test: {event} {host}")


if LOG:
    sys.addaudithook(_refuse)
