"""HeldBodies: the bytes of request bodies read whole and held until their requests
end, all requests of a process together, bounded by ``MLGATE_MAX_HELD_BODY_BYTES``.

Each body is bounded alone (``MLGATE_MAX_BODY_BYTES``), but nothing bounded them
together: 200 clients sending 16 MB bodies slowly took one process to 3.4 GB, and the
decoding of all of them at their end held the event loop 15 s (a review). A body over
``SMALL_BODY_BYTES`` counts here as its bytes are read (decompressed), not as its
``Content-Length`` declares them: a head that declares 16 MB and sends nothing holds
nothing (a review: counted declared, 32 such heads held the bound against every
tenant for the body timeout). Past the bound the body is refused 503 with
``Retry-After`` and the connection closed, its rest unread. Smaller bodies do not
count: their read is one step, and what they take is bounded by the connections.
Given back when the request ends (the front door), since the route holds the body
until then.
"""

from __future__ import annotations

from aiohttp import web

from mlgate.service.http.context import BODY_HELD
from mlgate.service.http.errors import Overloaded

SMALL_BODY_BYTES = 64 * 1024


class HeldBodies:
    def __init__(self, max_bytes: int, retry_after_s: int) -> None:
        self.max_bytes = max_bytes
        self.held = 0
        self._retry_after_s = retry_after_s

    def hold(self, request: web.Request, nbytes: int) -> None:
        """``nbytes`` more of ``request``'s body held; ``Overloaded`` (nothing held) when
        they would take the bodies past the bound."""
        if self.held + nbytes > self.max_bytes:
            raise Overloaded(
                f"Request bodies held in memory are at their bound ({self.max_bytes} bytes, "
                "MLGATE_MAX_HELD_BODY_BYTES): retry",
                retry_after_s=self._retry_after_s,
                headers={"Connection": "close"},
            )
        self.held += nbytes
        request[BODY_HELD] = request.get(BODY_HELD, 0) + nbytes

    def release(self, request: web.Request) -> None:
        """What ``request`` held, given back (its end)."""
        nbytes = request.get(BODY_HELD, 0)
        if nbytes:
            self.held -= nbytes
            del request[BODY_HELD]
