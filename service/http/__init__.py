"""The HTTP plumbing: request context, bodies, codecs, errors, the front door, metrics, OpenAPI, logs."""
