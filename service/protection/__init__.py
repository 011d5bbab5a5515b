"""Protection: API keys, rate limits, idempotency, audit, the shared Redis client, and the middleware that applies them."""
