"""TLS for deployments without a terminating proxy.

One ``ssl.SSLContext`` for the life of the process: SIGHUP loads the renewed
certificate and key into the same context, so new handshakes use them while open
connections carry on. ``seconds_until_expiry`` feeds the expiry gauge.
"""

from __future__ import annotations

import ssl
import time

import structlog

log = structlog.get_logger("mlgate.tls")


def create_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context


def reload(context: ssl.SSLContext, cert_file: str, key_file: str) -> bool:
    """Load the files again into ``context``; on failure keep serving the old pair."""
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        log.error("tls_reload_failed", error=repr(exc), cert_file=cert_file)
        return False
    log.info("tls_reloaded", cert_file=cert_file, expires_in_s=seconds_until_expiry(cert_file))
    return True


def seconds_until_expiry(cert_file: str) -> float:
    # The stdlib's own PEM decoder; it is private, but the only one without a dependency.
    decoded = ssl._ssl._test_decode_cert(cert_file)  # type: ignore[attr-defined]
    return ssl.cert_time_to_seconds(decoded["notAfter"]) - time.time()
