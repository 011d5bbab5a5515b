"""TLS without a terminating proxy: serving, the expiry gauge, renewal on SIGHUP."""

from __future__ import annotations

import asyncio
import http.client
import os
import shutil
import signal
import socket
import ssl
import subprocess
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mlgate.service.process.tls import (
    MAX_PEM_BYTES,
    CertificateNotValidNow,
    ServedCertificate,
    TlsFileRefused,
)
from tests.conftest import ServiceFactory
from tests.service_process import ServiceProcess, notify_socket, receive_until
from tests.system.test_connection_hygiene import connections_open_now, open_silently

OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(OPENSSL is None, reason="the openssl command is not installed")
DAY_S = 86_400


@dataclass(frozen=True)
class Certificate:
    cert: Path
    key: Path

    @property
    def der(self) -> bytes:
        return ssl.PEM_cert_to_DER_cert(self.cert.read_text())

    def install(self, live: Certificate) -> None:
        """Replace the files the service reads, each atomically, as a renewal tool does."""
        for source, target in ((self.key, live.key), (self.cert, live.cert)):
            staged = target.with_suffix(".new")
            shutil.copyfile(source, staged)
            os.replace(staged, target)


KEY_TYPES = {"ec": ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"], "rsa": ["-newkey", "rsa:2048"]}
SUBJECT_NAMES = "subjectAltName=DNS:localhost,IP:127.0.0.1"


def make_certificate(directory: Path, name: str, days: int, key_type: str = "ec") -> Certificate:
    """A self-signed certificate for localhost/127.0.0.1, valid ``days`` from now."""
    assert OPENSSL is not None
    directory.mkdir(parents=True, exist_ok=True)
    made = Certificate(directory / f"{name}.crt", directory / f"{name}.key")
    subprocess.run(
        [
            OPENSSL, "req", "-x509", *KEY_TYPES[key_type],
            "-noenc", "-keyout", str(made.key), "-out", str(made.cert), "-days", str(days),
            "-subj", f"/CN=mlgate-{name}", "-addext", SUBJECT_NAMES,
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return made


def make_dated_certificate(directory: Path, name: str, start: str, end: str) -> Certificate:
    """A self-signed certificate valid from ``start`` to ``end`` (``YYYYMMDDHHMMSSZ``):
    ``openssl ca`` sets both dates, ``req -x509`` only a number of days from now."""
    assert OPENSSL is not None
    ca = directory / f"{name}-ca"
    ca.mkdir(parents=True)
    (ca / "index.txt").touch()
    (ca / "serial").write_text("1000\n")
    (ca / "ca.cnf").write_text(
        "[ca]\ndefault_ca = own\n[own]\ndatabase = index.txt\nserial = serial\n"
        "new_certs_dir = .\ndefault_md = sha256\npolicy = any\ncopy_extensions = copy\n"
        "[any]\ncommonName = supplied\n"
    )
    made = Certificate(directory / f"{name}.crt", directory / f"{name}.key")
    run = {"check": True, "capture_output": True, "timeout": 30, "cwd": ca}
    subprocess.run(
        [OPENSSL, "req", "-new", *KEY_TYPES["ec"], "-noenc", "-keyout", str(made.key), "-out", "r.csr",
         "-subj", f"/CN=mlgate-{name}", "-addext", SUBJECT_NAMES],
        **run,  # type: ignore[call-overload]
    )
    subprocess.run(
        [OPENSSL, "ca", "-batch", "-config", "ca.cnf", "-selfsign", "-keyfile", str(made.key), "-in", "r.csr",
         "-out", str(made.cert), "-startdate", start, "-enddate", end],
        **run,  # type: ignore[call-overload]
    )
    return made


def start_tls_service(
    service_process: ServiceFactory, directory: Path, days: int, **env: str
) -> tuple[ServiceProcess, Certificate]:
    live = make_certificate(directory / "live", "live", days)
    service = service_process(
        scheme="https", MLGATE_TLS_CERT_FILE=str(live.cert), MLGATE_TLS_KEY_FILE=str(live.key), **env
    )
    return service, live


def trusting_anything() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def served_certificate(port: int) -> bytes:
    """The certificate a new connection is handed, whatever it is."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with trusting_anything().wrap_socket(raw, server_hostname="localhost") as tls:
            served = tls.getpeercert(binary_form=True)
    assert served is not None
    return served


def expiry_gauge(service: ServiceProcess) -> float:
    url = f"{service.url}/metrics"
    with urllib.request.urlopen(url, context=trusting_anything(), timeout=5) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        if family.name == "mlgate_tls_certificate_expiry_seconds":
            return float(family.samples[0].value)
    raise AssertionError("no mlgate_tls_certificate_expiry_seconds in /metrics")


def sighup_and_wait(service: ServiceProcess, sock: socket.socket) -> list[str]:
    """SIGHUP, then the notifications up to READY=1, which follows the reload hooks."""
    service.send(signal.SIGHUP)
    return receive_until(sock, "READY=1")


async def test_tls_serves_health_to_a_client_that_trusts_the_certificate(
    service_process: ServiceFactory, tmp_path: Path
) -> None:
    service, live = start_tls_service(service_process, tmp_path, days=30)
    context = ssl.create_default_context(cafile=str(live.cert))
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{service.url}/health", ssl=context) as response:
            assert response.status == 200


def test_expiry_gauge_counts_the_seconds_until_the_certificate_expires(
    service_process: ServiceFactory, tmp_path: Path
) -> None:
    service, live = start_tls_service(service_process, tmp_path, days=30)
    assert expiry_gauge(service) == pytest.approx(30 * DAY_S, abs=600)


def test_sighup_hands_new_connections_the_renewed_certificate(
    service_process: ServiceFactory, tmp_path: Path
) -> None:
    with notify_socket() as (path, sock):
        service, live = start_tls_service(service_process, tmp_path, days=30, NOTIFY_SOCKET=path)
        receive_until(sock, "READY=1")
        renewed = make_certificate(tmp_path, "renewed", days=90)
        assert served_certificate(service.port) == live.der != renewed.der
        renewed.install(live)
        sighup_and_wait(service, sock)
    assert served_certificate(service.port) == renewed.der
    assert [e for e in service.events() if e.get("event") == "reload_finished"][0]["failed"] == []


def test_connection_open_across_a_renewal_keeps_working_on_the_old_certificate(
    service_process: ServiceFactory, tmp_path: Path
) -> None:
    with notify_socket() as (path, sock):
        service, live = start_tls_service(service_process, tmp_path, days=30, NOTIFY_SOCKET=path)
        receive_until(sock, "READY=1")
        old = live.der
        context = ssl.create_default_context(cafile=str(live.cert))  # trusts only the old one
        connection = http.client.HTTPSConnection("127.0.0.1", service.port, context=context, timeout=5)
        try:
            connection.request("GET", "/health")
            assert connection.getresponse().read() and connection.sock is not None
            opened = connection.sock
            make_certificate(tmp_path, "renewed", days=90).install(live)
            sighup_and_wait(service, sock)
            connection.request("GET", "/health")
            response = connection.getresponse()
            assert response.status == 200 and response.read()
            assert connection.sock is opened and opened.getpeercert(binary_form=True) == old
        finally:
            connection.close()


def test_expiry_gauge_follows_the_renewed_certificate(
    service_process: ServiceFactory, tmp_path: Path
) -> None:
    with notify_socket() as (path, sock):
        service, live = start_tls_service(service_process, tmp_path, days=30, NOTIFY_SOCKET=path)
        receive_until(sock, "READY=1")
        make_certificate(tmp_path, "renewed", days=90).install(live)
        sighup_and_wait(service, sock)
    assert expiry_gauge(service) == pytest.approx(90 * DAY_S, abs=600)


def test_renewal_with_a_mismatched_key_keeps_serving_the_old_certificate(
    service_process: ServiceFactory, tmp_path: Path
) -> None:
    with notify_socket() as (path, sock):
        service, live = start_tls_service(service_process, tmp_path, days=30, NOTIFY_SOCKET=path)
        receive_until(sock, "READY=1")
        old = live.der
        renewed = make_certificate(tmp_path, "renewed", days=90)
        other = make_certificate(tmp_path, "other", days=90)
        Certificate(cert=renewed.cert, key=other.key).install(live)
        notified = sighup_and_wait(service, sock)
    assert served_certificate(service.port) == old
    assert "STATUS=reload failed: tls" in notified[-1].split("\n")
    assert expiry_gauge(service) == pytest.approx(30 * DAY_S, abs=600)


def test_a_key_that_does_not_match_its_certificate_stops_start_up_naming_the_tls_files(
    service_process: ServiceFactory, tmp_path: Path
) -> None:
    """A review: the mismatch was blamed on MLGATE_HOST and MLGATE_PORT."""
    one, other = make_certificate(tmp_path, "one", 30), make_certificate(tmp_path, "other", 30)
    service = service_process(
        wait=False, MLGATE_TLS_CERT_FILE=str(one.cert), MLGATE_TLS_KEY_FILE=str(other.key)
    )
    assert service.wait(30) == 2
    output = service.tail()
    assert f"mlgate: start-up error: MLGATE_TLS_CERT_FILE={one.cert}" in output
    assert "MLGATE_PORT" not in output and "Traceback" not in output


def test_a_renewal_to_another_key_type_serves_the_renewed_certificate_alone(
    service_process: ServiceFactory, tmp_path: Path
) -> None:
    """A review: the renewal was loaded into the served context beside the old pair,
    and OpenSSL keeps a certificate per key type: clients preferring the old type (TLS
    1.3's defaults, for an EC certificate) were still handed it, expired or not."""
    with notify_socket() as (path, sock):
        service, live = start_tls_service(service_process, tmp_path, days=30, NOTIFY_SOCKET=path)
        receive_until(sock, "READY=1")
        renewed = make_certificate(tmp_path, "renewed", days=90, key_type="rsa")
        renewed.install(live)
        sighup_and_wait(service, sock)
    assert served_certificate(service.port) == renewed.der


@pytest.mark.parametrize(
    ("start", "end", "reason"),
    [("20200101000000Z", "20200201000000Z", "expired"), ("20900101000000Z", "20910101000000Z", "not valid before")],
)
def test_a_renewal_that_is_not_valid_now_is_refused_and_the_served_one_kept(
    service_process: ServiceFactory, tmp_path: Path, start: str, end: str, reason: str
) -> None:
    """A review: a SIGHUP swapped a good certificate for an expired one (an info line),
    or one valid from 2035, which every verifying client refused."""
    with notify_socket() as (path, sock):
        service, live = start_tls_service(service_process, tmp_path, days=30, NOTIFY_SOCKET=path)
        receive_until(sock, "READY=1")
        old = live.der
        make_dated_certificate(tmp_path, "dated", start, end).install(live)
        notified = sighup_and_wait(service, sock)
    assert served_certificate(service.port) == old
    assert "STATUS=reload failed: tls" in notified[-1].split("\n")
    (failed,) = [e for e in service.events() if e.get("event") == "tls_reload_failed"]
    assert reason in failed["error"]


def test_a_certificate_not_yet_valid_at_start_is_warned_of_and_its_gauge_is_negative(
    service_process: ServiceFactory, tmp_path: Path
) -> None:
    """A review: a certificate valid from 2035 started without a word, and its expiry
    gauge (years ahead) never crossed the documented alert."""
    dated = make_dated_certificate(tmp_path, "future", "20900101000000Z", "20910101000000Z")
    service = service_process(
        scheme="https", MLGATE_TLS_CERT_FILE=str(dated.cert), MLGATE_TLS_KEY_FILE=str(dated.key)
    )
    assert expiry_gauge(service) < 0
    (warned,) = [e for e in service.events() if e.get("event") == "tls_certificate_not_valid_now"]
    assert "not valid before 2090" in warned["reason"]


def test_a_connection_that_never_finishes_its_handshake_is_closed_at_the_head_timeout(
    service_process: ServiceFactory, tmp_path: Path
) -> None:
    """A review: handshakes were held the loop's 60 s, uncounted against the connection
    cap, until the open-files limit refused every other client."""
    service, _ = start_tls_service(service_process, tmp_path, days=30, MLGATE_HEAD_TIMEOUT_S="1")
    with socket.create_connection(("127.0.0.1", service.port), timeout=30) as silent:
        assert silent.recv(1) == b""  # closed by the server, well before the 60 s


def test_a_process_restarted_beside_others_refuses_a_certificate_not_valid_now(tmp_path: Path) -> None:
    """A review: the others refused a renewal not yet valid at their reload, and a
    process restarted after a crash served it (its start-up only warned)."""
    dated = make_dated_certificate(tmp_path, "future", "20900101000000Z", "20910101000000Z")
    with pytest.raises(CertificateNotValidNow, match="not valid before 2090"):
        ServedCertificate(str(dated.cert), str(dated.key), must_be_valid_now=True)
    assert ServedCertificate(str(dated.cert), str(dated.key)).seconds_left() < 0  # a first start


def test_an_encrypted_private_key_is_refused_without_asking_for_its_passphrase(tmp_path: Path) -> None:
    """A review: OpenSSL asked for the passphrase on the terminal, and the event loop
    waited for someone to type it."""
    assert OPENSSL is not None
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    subprocess.run(
        [OPENSSL, "req", "-x509", *KEY_TYPES["ec"], "-keyout", str(key), "-out", str(cert), "-days", "3",
         "-subj", "/CN=mlgate", "-passout", "pass:secret"],
        check=True, capture_output=True, timeout=30,
    )
    with pytest.raises(TlsFileRefused, match="encrypted"):
        ServedCertificate(str(cert), str(key))


def test_a_certificate_file_past_the_size_limit_stops_start_up_naming_the_tls_files(
    service_process: ServiceFactory, tmp_path: Path
) -> None:
    """A review: it was a traceback and exit 1, a crash to a supervisor."""
    live = make_certificate(tmp_path, "live", 30)
    with open(live.cert, "a") as cert:
        cert.write("A" * (MAX_PEM_BYTES + 1))
    service = service_process(
        wait=False, MLGATE_TLS_CERT_FILE=str(live.cert), MLGATE_TLS_KEY_FILE=str(live.key)
    )
    assert service.wait(30) == 2
    output = service.tail()
    assert "mlgate: start-up error: MLGATE_TLS_CERT_FILE=" in output and "Traceback" not in output


async def test_tls_handshakes_finished_together_leave_no_more_than_the_cap_open(
    service_process: ServiceFactory, tmp_path: Path
) -> None:
    """A review: 300 TLS handshakes finished together were all kept against a cap of
    20 (a connection is counted once its handshake is done, and the cap was asked at
    the accept only), past the open-files limit."""
    service, _ = start_tls_service(
        service_process, tmp_path, 30, MLGATE_MAX_CONNECTIONS="10", MLGATE_HEAD_TIMEOUT_S="60"
    )
    writers = await open_silently(service.port, 250, ssl=trusting_anything())
    try:
        assert writers  # handshakes done
        await asyncio.sleep(0.5)  # what the server does with them, it has done
        # The cap, and the silent one the scrape's own connection displaced.
        assert await connections_open_now(service, ssl=trusting_anything()) <= 11
    finally:
        for writer in writers:
            writer.close()


async def test_a_busy_tls_client_is_answered_through_a_burst_of_handshakes_past_the_cap(
    service_process: ServiceFactory, tmp_path: Path
) -> None:
    """The fix's review: room made for handshakes ending past the cap took a busy
    client's connection between two of its requests (EOF, resets); it gets an answer
    to each, or the documented 503."""
    service, _ = start_tls_service(
        service_process, tmp_path, 30, MLGATE_MAX_CONNECTIONS="10", MLGATE_HEAD_TIMEOUT_S="60"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", service.port, ssl=trusting_anything())
    statuses: list[bytes] = []
    request = b"GET /health HTTP/1.1\r\nHost: mlgate\r\n\r\n"

    async def busy() -> None:
        for _ in range(150):
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            statuses.append(head.split(b" ", 2)[1])
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            if statuses[-1] != b"200":
                return
            await asyncio.sleep(0.02)

    client = asyncio.ensure_future(busy())
    silent = []
    for _ in range(3):
        silent += await open_silently(service.port, 250, ssl=trusting_anything())
    try:
        await asyncio.wait_for(client, 30)
        assert set(statuses) <= {b"200", b"503"} and statuses.count(b"200") >= len(statuses) - 1
    finally:
        writer.close()
        for one in silent:
            one.close()
