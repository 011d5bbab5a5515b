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


# While start-up runs, systemd is asked this often for this much more time than its
# ``TimeoutStartSec``: models load for as long as ``MLGATE_MODEL_LOAD_TIMEOUT_S`` (300 s
# by default), and the unit's 90 s killed a start-up loading a large model, again and
# again under ``Restart=on-failure`` (a review).
EXTEND_EVERY_S, EXTEND_BY_S = 10.0, 30


def starting(status: str = "loading models") -> bool:
    return notify(f"EXTEND_TIMEOUT_USEC={EXTEND_BY_S * 1_000_000}", f"STATUS=starting: {status}")


def ready(status: str = "serving") -> bool:
    return notify("READY=1", f"STATUS={status}")


def reloading() -> bool:
    # systemd >= 253 wants a monotonic timestamp with RELOADING=1 (Type=notify-reload).
    return notify(
        "RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
    )


def stopping() -> bool:
    return notify("STOPPING=1")
