"""sd_notify datagrams: filesystem and abstract-namespace sockets, no socket at all."""

from __future__ import annotations

import socket
import uuid

import pytest

from mlgate.service.process import systemd
from tests.service_process import notify_socket


def test_ready_reaches_a_filesystem_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    with notify_socket() as (path, sock):
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert systemd.ready("serving")
        assert sock.recv(4096).decode().split("\n") == ["READY=1", "STATUS=serving"]


def test_stopping_reaches_an_abstract_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"mlgate-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.stopping()
        assert sock.recv(4096) == b"STOPPING=1"


def test_notify_without_a_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.ready() is False


def test_starting_asks_for_more_start_up_time_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    with notify_socket() as (path, sock):
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert systemd.starting()
        assert sock.recv(4096).decode().split("\n") == [
            f"EXTEND_TIMEOUT_USEC={systemd.EXTEND_BY_S * 1_000_000}",
            "STATUS=starting: loading models",
        ]
