"""TLS for deployments without a terminating proxy.

``ServedCertificate`` owns the context the listening socket is given for the life of
the process, ``ServedContext``: it holds no certificate of its own, but makes each
connection's TLS object from the context of the pair served now. ``reload()``
(SIGHUP) builds a fresh context from the renewed files and serves it to new
connections, while open connections carry on with theirs. The files are read once,
and the context, the expiry and the validity checks all come from those bytes: a key
that does not match, a renewal caught half-written or one not valid now raises and
leaves the served pair as it was. (Loading a renewal into the live context, as this
module once did, kept the old certificate of another key type beside the new one,
served to clients preferring that type, and a pair changed between two reads of the
files left the live context with no usable key.)
"""

from __future__ import annotations

import contextlib
import errno
import os
import ssl
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import structlog

log = structlog.get_logger("mlgate.tls")

# The most a certificate chain or key file may hold.
MAX_PEM_BYTES = 1024 * 1024


class TlsFileRefused(OSError):
    """A certificate or key file mlgate does not serve: an ``OSError`` as the file's
    other errors are, so start-up names the TLS settings and exits 2."""

    def __init__(self, message: str, filename: str | None = None) -> None:
        if filename is None:
            super().__init__(errno.EINVAL, message)
        else:
            super().__init__(errno.EINVAL, message, filename)


class CertificateNotValidNow(TlsFileRefused):
    """A certificate outside its validity period (expired, or not yet valid)."""


def _no_passphrase() -> bytes:
    # Without this OpenSSL asks for the passphrase on the terminal, if there is one,
    # and the event loop waits for someone to type it (a review).
    raise TlsFileRefused("the private key is encrypted: mlgate takes an unencrypted key file")


class ServedContext(ssl.SSLContext):
    """The listening socket's context: each connection's TLS object is made from
    ``current``, the context of the pair served when the connection opens."""

    current: ssl.SSLContext

    def wrap_bio(self, incoming: Any, outgoing: Any, server_side: bool = False,
                 server_hostname: Any = None, session: Any = None) -> ssl.SSLObject:
        return self.current.wrap_bio(incoming, outgoing, server_side, server_hostname, session)

    def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        return self.current.wrap_socket(sock, *args, **kwargs)


def _server_context() -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class Loaded:
    """A context of one pair, read once, and its certificate's validity period."""

    def __init__(self, cert_file: str, key_file: str) -> None:
        cert, key = _read(cert_file), _read(key_file)
        with _private_copy(cert) as cert_path, _private_copy(key) as key_path:
            self.context = _server_context()
            self.context.load_cert_chain(cert_path, key_path, password=_no_passphrase)
            decoded = ssl._ssl._test_decode_cert(cert_path)  # type: ignore[attr-defined]
        self.not_before = float(ssl.cert_time_to_seconds(decoded["notBefore"]))
        self.not_after = float(ssl.cert_time_to_seconds(decoded["notAfter"]))

    def invalid_now(self) -> str | None:
        """Why the certificate is not valid now, if it is not."""
        now = time.time()
        if now < self.not_before:
            return f"not valid before {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(self.not_before))}"
        if now > self.not_after:
            return f"expired at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(self.not_after))}"
        return None


class ServedCertificate:
    """``must_be_valid_now``: a certificate not valid now is refused, as a reload
    refuses it (a process restarted beside others that refused it at a reload), rather
    than served with a warning (a host's first start: refusing it would take every
    client down, serving it only those that verify it)."""

    def __init__(self, cert_file: str, key_file: str, must_be_valid_now: bool = False) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self._served = Loaded(cert_file, key_file)
        if (reason := self._served.invalid_now()) is not None:
            if must_be_valid_now:
                raise CertificateNotValidNow(f"the certificate is {reason}", cert_file)
            log.warning("tls_certificate_not_valid_now", cert_file=cert_file, reason=reason)
        self.context = ServedContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.current = self._served.context

    @property
    def not_after(self) -> float:
        return self._served.not_after

    def reload(self) -> None:
        """Serve the files' current pair to new connections; raises if they do not load
        or the certificate is not valid now (a renewal to an expired or future
        certificate would fail every verifying client)."""
        try:
            loaded = Loaded(self.cert_file, self.key_file)
            if (reason := loaded.invalid_now()) is not None:
                raise CertificateNotValidNow(f"the renewed certificate is {reason}", self.cert_file)
        except OSError as exc:  # ssl.SSLError and TlsFileRefused are OSErrors
            log.error("tls_reload_failed", error=repr(exc), cert_file=self.cert_file)
            raise
        self._served = loaded
        self.context.current = loaded.context
        log.info("tls_reloaded", cert_file=self.cert_file, expires_in_s=round(self.seconds_left()))

    def seconds_left(self) -> float:
        """Seconds the served certificate stays valid; negative when it is not valid now
        (expired, or not yet valid: by how long until it is), so an alert on a low
        value fires for both."""
        now = time.time()
        if now < self._served.not_before:
            return now - self._served.not_before
        return self._served.not_after - now


def _read(path: str) -> bytes:
    with open(path, "rb") as file:
        data = file.read(MAX_PEM_BYTES + 1)
    if len(data) > MAX_PEM_BYTES:
        raise TlsFileRefused(f"more than {MAX_PEM_BYTES} bytes: no certificate or key file", path)
    return data


@contextlib.contextmanager
def _private_copy(data: bytes) -> Iterator[str]:
    """A path holding ``data`` for OpenSSL to load, readable by this process alone: an
    anonymous in-memory file where the system has them (a key never touches a disk)."""
    path = ""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("mlgate-tls", getattr(os, "MFD_CLOEXEC", 0))
    else:
        fd, path = tempfile.mkstemp(prefix="mlgate-tls-")
    try:
        with open(fd, "wb", closefd=False) as file:
            file.write(data)
        yield path or f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)
        if path:
            os.unlink(path)
