"""sd_notify over ``$NOTIFY_SOCKET``: READY=1, RELOADING=1, STOPPING=1, STATUS=...

A few lines of the protocol rather than a dependency: one datagram per message to
the unix socket systemd names (a leading ``@`` means the abstract namespace).
Without ``NOTIFY_SOCKET`` every call is a no-op.
"""

from __future__ import annotations

import os
import socket
import time


def notify(*states: str) -> bool:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    message = "\n".join(states).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(address)
            sock.sendall(message)
        except OSError:
            return False
    return True


def ready(status: str = "serving") -> bool:
    return notify("READY=1", f"STATUS={status}")


def reloading() -> bool:
    # systemd >= 253 wants a monotonic timestamp with RELOADING=1 (Type=notify-reload).
    return notify(
        "RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
    )


def stopping() -> bool:
    return notify("STOPPING=1")
