"""Request-scoped state: the typed keys a request carries through the middlewares.

The front door sets ``REQUEST_ID``; the protection middleware sets ``API_KEY``,
``TENANT`` and ``KEY_ID`` once the key is checked, and ``BUFFERED_BODY`` when an
``Idempotency-Key`` request had to read its body up front (``http.body`` serves it).
"""

from __future__ import annotations

from aiohttp import web

from mlgate.service.protection.api_keys import ApiKey

REQUEST_ID = web.RequestKey("request_id", str)
TENANT = web.RequestKey("tenant", str)
KEY_ID = web.RequestKey("key_id", str)
API_KEY = web.RequestKey("api_key", ApiKey)
BUFFERED_BODY = web.RequestKey("buffered_body", bytes)
