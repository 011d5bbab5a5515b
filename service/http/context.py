"""Request-scoped state: the typed keys a request carries through the middlewares.

The front door sets ``REQUEST_ID`` and ``ARRIVED`` (``time.monotonic()`` when the app
began on it: a request's deadline counts from there, the middlewares' waits included); the protection middleware sets ``API_KEY``,
``TENANT`` and ``KEY_ID`` once the key is checked, and ``BUFFERED_BODY`` when an
``Idempotency-Key`` request had to read its body up front (``http.body`` serves it);
``REFUSED_UNREAD`` marks a request answered with a refusal before its body is sent
(``Expect: 100-continue``), whose body no middleware may wait for. ``WORK_BEGAN``
marks a request whose handler did something that lasts (records written, a model
load tried) before it failed: its 4xx is kept for an ``Idempotency-Key``'s repeats.
"""

from __future__ import annotations

import time

from aiohttp import web

from mlgate.service.protection.api_keys import ApiKey

REQUEST_ID = web.RequestKey("request_id", str)
ARRIVED = web.RequestKey("arrived", float)
TENANT = web.RequestKey("tenant", str)
KEY_ID = web.RequestKey("key_id", str)
API_KEY = web.RequestKey("api_key", ApiKey)
BUFFERED_BODY = web.RequestKey("buffered_body", bytes)
REFUSED_UNREAD = web.RequestKey("refused_unread", bool)
WORK_BEGAN = web.RequestKey("work_began", bool)
# Bytes of its body the request holds in ``HeldBodies`` (service.http.held_bodies).
BODY_HELD = web.RequestKey("body_held", int)


def arrived(request: web.Request) -> float:
    """When the app began on ``request`` (``time.monotonic()``); now, for a request the
    front door did not see."""
    return request.get(ARRIVED) or time.monotonic()
