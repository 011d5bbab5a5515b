"""``serve --workers 2``: two processes on one port, metrics summed, one SIGTERM stops all."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mlgate.service.process.supervisor import _mark_dead
from mlgate.workers.sinks.local_log import read_log
from tests.conftest import ServiceFactory
from tests.service.process.test_tls import make_certificate, make_dated_certificate
from tests.service_process import (
    ServiceProcess,
    child_pids,
    is_running,
    notify_socket,
    receive_until,
)
from tests.support import KafkaBroker

REQUESTS = 40
INGEST_202 = ("mlgate_http_requests_total", (("method", "POST"), ("route", "/api/v2/ingest"), ("status", "202")))


def start_two_processes(service_process: ServiceFactory) -> ServiceProcess:
    """Returns once the supervisor says READY=1: both processes listen, not just one."""
    with notify_socket() as (path, sock):
        service = service_process(
            "--workers", "2", wait=False, NOTIFY_SOCKET=path, MLGATE_PER_PROCESS_STATE="true"
        )
        receive_until(sock, "READY=1")
    return service


async def ingest_on_fresh_connections(service: ServiceProcess, count: int) -> None:
    """Each request on a new connection, so the kernel spreads them over the processes."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        for i in range(count):
            body = {"source": "mp", "records": [{"record_id": f"r-{i}", "features": [1, 2, 3, 4]}]}
            async with session.post(f"{service.url}/api/v2/ingest", json=body) as response:
                assert response.status == 202


async def scrape(service: ServiceProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(f"{service.url}/metrics") as response:
            text = await response.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def written_by_each_process(data_dir: Path) -> tuple[list[str], list[str]]:
    """Record ids in the logs of process 0 (``data_dir``) and 1 (``data_dir/worker-1``)."""
    return (
        [entry.record.key.decode() for entry in read_log(data_dir / "log")],
        [entry.record.key.decode() for entry in read_log(data_dir / "worker-1" / "log")],
    )


async def test_two_processes_serve_one_port_each_writing_its_own_log(
    service_process: ServiceFactory,
) -> None:
    service = start_two_processes(service_process)
    await ingest_on_fresh_connections(service, REQUESTS)
    # Each 202 came after its record was fsync'd, so both logs are complete now.
    first, second = written_by_each_process(service.data_dir)
    assert first and second
    assert sorted(first + second) == sorted(f"r-{i}" for i in range(REQUESTS))


async def test_metrics_count_the_requests_of_both_processes_whichever_answers_the_scrape(
    service_process: ServiceFactory,
) -> None:
    service = start_two_processes(service_process)
    await ingest_on_fresh_connections(service, REQUESTS)
    assert all(written_by_each_process(service.data_dir))  # both processes took some
    scrapes = await asyncio.gather(*(scrape(service) for _ in range(8)))
    assert [samples[INGEST_202] for samples in scrapes] == [float(REQUESTS)] * 8


def serving_children(pid: int) -> set[int]:
    """The supervisor's serving processes (not multiprocessing's resource tracker)."""
    return {
        child
        for child in child_pids(pid)
        if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes()
    }


def test_sigterm_to_the_supervisor_stops_both_processes_and_exits_0(
    service_process: ServiceFactory,
) -> None:
    with notify_socket() as (path, sock):
        service = service_process("--workers", "2", MLGATE_PER_PROCESS_STATE="true", wait=False, NOTIFY_SOCKET=path,
                                  MLGATE_SHUTDOWN_TIMEOUT_S="5")
        receive_until(sock, "READY=1")
        servers = serving_children(service.pid)
        assert len(servers) == 2
        service.send(signal.SIGTERM)
        receive_until(sock, "STOPPING=1")
        assert service.wait(15) == 0
    assert not [pid for pid in servers if is_running(pid)]


def test_supervisor_exits_2_when_a_process_cannot_start_on_a_setting(
    service_process: ServiceFactory, tmp_path: Path
) -> None:
    data_dir = tmp_path / "service0" / "data"  # the fixture's first service's
    data_dir.mkdir(parents=True)
    (data_dir / "worker-1").write_text("a file where process 1's data directory goes")
    service = service_process("--workers", "2", MLGATE_PER_PROCESS_STATE="true", wait=False)
    # Process 1 cannot start; the supervisor gives up instead of restarting it forever,
    # with the exit code and the line one process gives.
    assert service.wait(30) == 2
    output = service.tail()
    assert "worker_failed_to_start" in output
    assert f"mlgate: start-up error: MLGATE_DATA_DIR={data_dir}" in output


@pytest.mark.parametrize("shared", [False, True], ids=["plain", "reuse-port"])
def test_supervisor_refuses_a_port_another_service_holds_and_exits_2(
    service_process: ServiceFactory, shared: bool
) -> None:
    """Another service's processes may share the port (``SO_REUSEPORT``): the children,
    binding with it too, would have taken half its connections (a review)."""
    with socket.socket() as taken:
        if shared:
            taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        service = service_process(
            "--workers", "2", "--port", str(port), wait=False, MLGATE_PER_PROCESS_STATE="true"
        )
        assert service.wait(30) == 2
    assert "start_up_failed" in service.tail()
    assert f"MLGATE_PORT={port}" in service.tail()


def test_processes_drain_and_exit_when_the_supervisor_is_killed(
    service_process: ServiceFactory,
) -> None:
    """SIGKILL leaves the supervisor no say: the kernel sends each child SIGTERM, so
    none keeps serving under init, holding the port and its data directory's lock."""
    service = start_two_processes(service_process)
    servers = serving_children(service.pid)
    assert len(servers) == 2
    service.send(signal.SIGKILL)
    service.wait(5)
    deadline = time.monotonic() + 20
    while [pid for pid in servers if is_running(pid)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in servers if is_running(pid)]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", service.port), timeout=1).close()


def test_processes_that_keep_dying_with_none_serving_make_the_supervisor_stop_and_exit_1(
    service_process: ServiceFactory,
) -> None:
    """A review: a process that could not start again was restarted every second for
    ever, and SIGTERM then exited 0. Here none can: the keys file both read is broken."""
    service = start_two_processes(service_process)
    (service.data_dir / "keys.json").write_text("{not json")
    for pid in serving_children(service.pid):
        os.kill(pid, signal.SIGKILL)
    assert service.wait(60) == 1
    assert "worker_crash_loop" in service.tail()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", service.port), timeout=1).close()


async def test_a_process_that_cannot_start_again_leaves_the_others_serving_and_says_so(
    service_process: ServiceFactory,
) -> None:
    """A review: a renewal the processes had refused at a reload, read again by one
    restarted after a crash, made a crash loop that stopped the whole host. Process 1
    dies and cannot start again (its data directory became a file); process 0 serves
    on, /ready says what is wrong, and the stop after exits 1."""
    service = start_two_processes(service_process)
    worker_1 = service.data_dir / "worker-1"
    process_1 = child_using(serving_children(service.pid), worker_1)
    shutil.rmtree(worker_1)
    worker_1.write_text("a file where the process's data directory was")
    os.kill(process_1, signal.SIGKILL)
    await until_logged(service, "worker_cannot_start")
    async with aiohttp.ClientSession() as session:
        for _ in range(10):  # whichever process the kernel hands it to: only 0 is left
            async with session.get(f"{service.url}/ready") as response:
                assert response.status == 200
                body = await response.json()
            assert "cannot start again" in body["degraded"]["processes"]
    assert is_running(service.pid)
    service.send(signal.SIGTERM)
    assert service.wait(30) == 1


def child_using(pids: set[int], directory: Path) -> int:
    """The process of ``pids`` with a file open in ``directory`` (its data directory)."""
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith(f"{directory}/"):
                return pid
    raise AssertionError(f"no process has a file open in {directory}")


async def until_logged(service: ServiceProcess, event: str, timeout_s: float = 30) -> None:
    for _ in range(int(timeout_s / 0.1)):
        if event in service.tail(400):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{event} not logged within {timeout_s:g} s")


async def test_ready_answers_for_the_host_when_one_process_cannot_serve_its_model(
    service_process: ServiceFactory, tmp_path: Path
) -> None:
    """A review: a process restarted after the model file broke could not load it, and
    /ready said 200 or 503 by which process the connection reached (the balancer saw
    the host flap; half of its predicts failed)."""
    models = _copy_of_the_demo_model(tmp_path)
    with notify_socket() as (path, sock):
        service = service_process(
            "--workers", "2", MLGATE_PER_PROCESS_STATE="true", wait=False, NOTIFY_SOCKET=path,
            MLGATE_MODEL_REPOSITORY=str(models), MLGATE_MODEL_POLL_INTERVAL_S="0",
        )
        receive_until(sock, "READY=1")
    _break_its_files(models)  # the running processes keep what they loaded
    victim = sorted(serving_children(service.pid))[0]
    os.kill(victim, signal.SIGKILL)  # restarted by the supervisor: it cannot load it
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def ready() -> tuple[int, str]:
            async with session.get(f"{service.url}/ready") as response:
                return response.status, str((await response.json()).get("reasons"))

        for _ in range(100):  # until the restarted process serves and says what is wrong
            status, reasons = await ready()
            if "failed to load" in reasons:
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.5)  # its siblings have read what it published
        answers = [await ready() for _ in range(20)]  # new connections: both processes
    assert [status for status, _ in answers] == [503] * 20
    assert all("failed to load" in reasons for _, reasons in answers)


def _copy_of_the_demo_model(tmp_path: Path) -> Path:
    models = tmp_path / "models"
    shutil.copytree(Path(__file__).resolve().parents[2] / "models" / "demo", models / "demo")
    return models


def _break_its_files(models: Path) -> None:
    for model_file in models.glob("demo/*/model.onnx"):
        model_file.write_bytes(b"garbage")


def test_a_hung_process_is_killed_and_replaced(service_process: ServiceFactory) -> None:
    """A process whose event loop stopped turning still holds its share of the port:
    a review saw half the connections, health checks included, go unanswered."""
    with notify_socket() as (path, sock):
        service = service_process(
            "--workers", "2", MLGATE_PER_PROCESS_STATE="true", wait=False, NOTIFY_SOCKET=path, MLGATE_WORKER_TIMEOUT_S="2"
        )
        receive_until(sock, "READY=1")
    hung = sorted(serving_children(service.pid))[0]
    os.kill(hung, signal.SIGSTOP)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        servers = serving_children(service.pid)
        if hung not in servers and len(servers) == 2:
            break
        time.sleep(0.2)
    assert hung not in serving_children(service.pid)
    assert "worker_hung" in service.tail()
    wait_for_two_serving(service)
    # Counted where any process's scrape sees it, not only logged (a review).
    with urllib.request.urlopen(f"{service.url}/metrics", timeout=5) as response:
        scraped = response.read().decode()
    assert 'mlgate_worker_restarts_total{reason="hung"} 1.0' in scraped
    assert 'reason="died"' not in scraped  # one restart, counted once


def test_a_process_hung_before_it_serves_is_killed_and_replaced(
    service_process: ServiceFactory, private_kafka_broker: KafkaBroker
) -> None:
    """A review: a process restarted and stuck in its start-up (its event loop
    blocked) was never killed nor said to be: only serving ones were watched. A frozen
    broker holds a restart's start-up ~5 s; the new process is stopped meanwhile."""
    with notify_socket() as (path, sock):
        service = service_process(
            "--workers", "2", wait=False, NOTIFY_SOCKET=path, MLGATE_PER_PROCESS_STATE="true",
            MLGATE_WORKER_TIMEOUT_S="1", MLGATE_KAFKA_BOOTSTRAP_SERVERS=private_kafka_broker.bootstrap,
        )
        receive_until(sock, "READY=1")
    first = serving_children(service.pid)
    assert private_kafka_broker.process is not None
    private_kafka_broker.process.send_signal(signal.SIGSTOP)
    try:
        os.kill(sorted(first)[0], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while service.output.read_text(errors="replace").count('"local_log_started"') < 3:
            assert time.monotonic() < deadline, service.tail()
            time.sleep(0.05)
        [stuck] = serving_children(service.pid) - first
        os.kill(stuck, signal.SIGSTOP)
        while stuck in serving_children(service.pid):
            assert time.monotonic() < deadline, service.tail()
            time.sleep(0.1)
    finally:
        private_kafka_broker.process.send_signal(signal.SIGCONT)
    hung = [line for line in service.tail(200).splitlines() if '"worker_hung"' in line]
    assert len(hung) == 1 and '"serving":false' in hung[0]
    wait_for_two_serving(service)


def wait_for_two_serving(service: ServiceProcess) -> None:
    """Every connection answered: no process left that takes them and says nothing."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            for _ in range(10):
                with socket.create_connection(("127.0.0.1", service.port), timeout=2) as conn:
                    conn.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    assert conn.recv(64).startswith(b"HTTP/1.1 200")
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError("the replacement process never served")


def test_several_processes_without_redis_are_refused_at_start(service_process: ServiceFactory) -> None:
    """Each would keep its own Idempotency-Keys and record ids: a repeat reaching the
    other process ran again and wrote its records twice (a review)."""
    service = service_process("--workers", "2", wait=False)
    assert service.wait(30) == 2
    assert "--workers 2 without REDIS_URL" in service.tail()  # named as it was set
    assert "MLGATE_PER_PROCESS_STATE=true" in service.tail()


def test_a_reload_of_several_processes_is_told_to_systemd_with_what_failed(
    service_process: ServiceFactory,
) -> None:
    """A review: with several processes, SIGHUP told systemd nothing, failed or not."""
    with notify_socket() as (path, sock):
        service = service_process(
            "--workers", "2", wait=False, NOTIFY_SOCKET=path, MLGATE_PER_PROCESS_STATE="true"
        )
        receive_until(sock, "READY=1")
        service.send(signal.SIGHUP)
        reloaded = receive_until(sock, "READY=1")
        (service.data_dir / "keys.json").write_text("{not json")
        service.send(signal.SIGHUP)
        failed = receive_until(sock, "READY=1")
    assert reloaded[0].split("\n")[0] == "RELOADING=1"
    assert "STATUS=reloaded" in reloaded[-1].split("\n")
    assert "STATUS=reload failed: api_keys" in failed[-1].split("\n")


def metrics_dirs() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("mlgate-metrics-*"))


def aged(directory: Path) -> None:
    """As if made two minutes ago: a younger one is never taken for an orphan."""
    past = time.time() - 120
    os.utime(directory, (past, past))


def test_the_metrics_directory_of_a_killed_supervisor_is_removed_by_the_next(
    service_process: ServiceFactory,
) -> None:
    """A review: a supervisor killed with SIGKILL left its metrics directory behind,
    one more for each hard kill."""
    before = metrics_dirs()
    first = start_two_processes(service_process)
    (left,) = metrics_dirs() - before
    children = serving_children(first.pid)
    first.send(signal.SIGKILL)
    first.wait(30)
    deadline = time.monotonic() + 30  # they drain and exit when their supervisor dies
    while any(is_running(child) for child in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    aged(left)
    start_two_processes(service_process)
    assert not left.exists()


def test_the_metrics_directory_of_a_live_supervisor_or_of_no_mlgate_is_left_alone(
    service_process: ServiceFactory, tmp_path: Path
) -> None:
    """A review of the first version: a supervisor in another PID namespace (a
    container sharing /tmp) had its live directory removed, and a directory named
    ``mlgate-metrics-²-x`` stopped every start."""
    before = metrics_dirs()
    first = start_two_processes(service_process)
    (live,) = metrics_dirs() - before
    aged(live)
    strange = Path(tempfile.gettempdir()) / "mlgate-metrics-\u00b2-x"
    strange.mkdir()
    try:
        aged(strange)
        start_two_processes(service_process)
        assert live.exists() and strange.exists()
    finally:
        shutil.rmtree(strange)
    assert is_running(first.pid)


def test_a_process_that_never_served_leaves_no_metric_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A review: a process retried every 30 s at a start-up error left two files a try,
    each read by every scrape."""
    for name in ("counter_123.db", "histogram_123.db", "gauge_livesum_123.db", "counter_999.db"):
        (tmp_path / name).write_bytes(b"")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    _mark_dead(123, never_served=True)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["counter_999.db"]


def test_a_process_restarted_after_a_refused_renewal_refuses_it_too(
    service_process: ServiceFactory, tmp_path: Path
) -> None:
    """A review: the processes' reload refused a renewal not yet valid, and one
    restarted after a crash served it to a share of the clients."""
    live = make_certificate(tmp_path / "live", "live", 30)
    with notify_socket() as (path, sock):
        service = service_process(
            "--workers", "2", wait=False, scheme="https", NOTIFY_SOCKET=path,
            MLGATE_PER_PROCESS_STATE="true", MLGATE_TLS_CERT_FILE=str(live.cert),
            MLGATE_TLS_KEY_FILE=str(live.key),
        )
        receive_until(sock, "READY=1")
        make_dated_certificate(tmp_path, "future", "20900101000000Z", "20910101000000Z").install(live)
        service.send(signal.SIGHUP)
        assert "STATUS=reload failed: tls" in receive_until(sock, "READY=1")[-1].split("\n")
    os.kill(min(serving_children(service.pid)), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while "worker_cannot_start" not in service.tail(400) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "worker_cannot_start" in service.tail(400)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["heroku-sigterm", "ctrl-c"])
def test_a_stop_signal_to_the_whole_process_group_is_a_clean_stop(
    service_process: ServiceFactory, signum: signal.Signals
) -> None:
    """A review: Heroku's stop (SIGTERM) and a terminal's Ctrl-C (SIGINT) signal every
    process of the group; a process that had stopped cleanly was then killed by the
    signal its supervisor forwarded, and the stop was reported ``worker_stopped_badly``
    with exit 1, two times in three. Two rounds, as the loss was a race."""
    for _ in range(2):
        service = service_process("--workers", "2", MLGATE_PER_PROCESS_STATE="true")
        deadline = time.monotonic() + 30
        while service.tail(200).count('"event":"serving"') < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert service.tail(200).count('"event":"serving"') == 2, service.tail()
        os.killpg(service.pid, signum)
        assert service.wait(30) == 0, service.tail()
        assert "worker_stopped_badly" not in service.tail(200)
