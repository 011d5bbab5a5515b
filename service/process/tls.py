"""TLS for deployments without a terminating proxy.

``ServedCertificate`` owns the one ``ssl.SSLContext`` the listening socket uses for the
life of the process. ``reload()`` (SIGHUP) loads the renewed certificate and key into
that same context, so new handshakes get them while open connections carry on. The
files are first tried in a scratch context: a key that does not match, or a renewal
caught half-written, raises and leaves the served pair as it was. (Loading straight
into the live context would not: OpenSSL drops the old key as soon as a certificate it
does not match is loaded, and every later handshake fails.) The expiry gauge reads the
certificate actually served, not whatever the file holds now.
"""

from __future__ import annotations

import ssl
import time

import structlog

log = structlog.get_logger("mlgate.tls")


def _server_context() -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def not_after(cert_file: str) -> float:
    """The certificate's expiry as a POSIX timestamp (the first certificate of the file)."""
    # The stdlib's own PEM decoder; it is private, but the only one without a dependency.
    decoded = ssl._ssl._test_decode_cert(cert_file)  # type: ignore[attr-defined]
    return float(ssl.cert_time_to_seconds(decoded["notAfter"]))


class ServedCertificate:
    def __init__(self, cert_file: str, key_file: str) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.context = _server_context()
        self.context.load_cert_chain(cert_file, key_file)
        self.not_after = not_after(cert_file)

    def reload(self) -> None:
        """Serve the files' current pair to new connections; raises if they do not load."""
        try:
            _server_context().load_cert_chain(self.cert_file, self.key_file)
            expires = not_after(self.cert_file)
        except (OSError, ssl.SSLError) as exc:
            log.error("tls_reload_failed", error=repr(exc), cert_file=self.cert_file)
            raise
        self.context.load_cert_chain(self.cert_file, self.key_file)
        self.not_after = expires
        log.info("tls_reloaded", cert_file=self.cert_file, expires_in_s=round(self.seconds_left()))

    def seconds_left(self) -> float:
        return self.not_after - time.time()
