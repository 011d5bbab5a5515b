"""A real Redis Cluster for tests: N masters with R replicas each, on free local ports.

``start_redis_cluster()`` starts the ``redis-server --cluster-enabled yes`` processes,
joins them with ``redis-cli --cluster create`` and returns once every node reports
``cluster_state:ok``. The node timeout is short (1 s), so a killed master's replica is
promoted within a few seconds (``kill_master`` then ``wait_for_failover``).

The nodes listen on 127.0.0.1 and, given ``host``, on that address too, which is then
the one they announce (in ``CLUSTER SLOTS``, MOVED redirects and on the cluster bus):
clients elsewhere, such as the multi-host rig's network namespaces, reach every node
at the address the cluster hands out, and a killed node's port refuses connections.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis
from redis.crc import key_slot

from bench.processes import redis_command
from tests.support import ManagedProcess

NODE_TIMEOUT_MS = 1000
BUS_PORT_OFFSET = 10000  # redis-server's cluster bus listens on port + 10000
_PORTS = random.SystemRandom()  # not the shared generator a test may have seeded


@dataclass
class RedisClusterProcesses:
    """The nodes of a running test cluster (``.seeds``, ``.url`` for clients)."""

    nodes: list[ManagedProcess]
    workdir: Path
    host: str = "127.0.0.1"  # the address the nodes announce
    killed: list[ManagedProcess] = field(default_factory=list)

    @property
    def seeds(self) -> list[str]:
        return [f"{self.host}:{node.port}" for node in self.nodes]

    @property
    def url(self) -> str:
        """``redis://`` of one seed node (the client discovers the others)."""
        return f"redis://{self.seeds[0]}"

    @property
    def seeds_url(self) -> str:
        """Every seed, comma-separated (``MLGATE_REDIS_URL`` in cluster mode takes this)."""
        return ",".join(f"redis://{seed}" for seed in self.seeds)

    def alive(self) -> list[ManagedProcess]:
        return [node for node in self.nodes if node not in self.killed]

    def masters(self) -> list[ManagedProcess]:
        """The live masters, ordered by the first slot each serves."""
        by_port = {node.port: node for node in self.alive()}
        owners: list[tuple[int, ManagedProcess]] = []
        with _client(self.alive()[0].port) as client:
            for line in client.execute_command("CLUSTER", "NODES").decode().splitlines():
                fields = line.split()
                port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
                flags = fields[2].split(",")
                if "master" in flags and "fail" not in flags and port in by_port and fields[8:]:
                    first_slot = int(fields[8].split("-")[0])
                    owners.append((first_slot, by_port[port]))
        return [node for _, node in sorted(owners, key=lambda owner: owner[0])]

    def master_index_of(self, key: str) -> int:
        """The index (for ``kill_master``) of the master serving ``key``'s slot."""
        slot = key_slot(key.encode())
        with _client(self.alive()[0].port) as client:
            ranges = client.execute_command("CLUSTER", "SLOTS")
        owner_port = next(int(r[2][1]) for r in ranges if int(r[0]) <= slot <= int(r[1]))
        return [node.port for node in self.masters()].index(owner_port)

    def kill_master(self, index: int = 0) -> ManagedProcess:
        """SIGKILL the ``index``-th master (by first slot); returns its node. The
        cluster promotes its replica after about ``NODE_TIMEOUT_MS``: ``wait_for_failover``."""
        master = self.masters()[index]
        assert master.process is not None
        master.process.kill()
        master.process.wait()
        master.process = None
        self.killed.append(master)
        return master

    def wait_for_failover(self, masters: int = 3, timeout_s: float = 30.0) -> None:
        """Until ``masters`` live masters serve every slot and each live node says ok."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if len(self.masters()) == masters and self._all_ok():
                    return
            except redis.RedisError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"the cluster did not recover within {timeout_s} s")

    def flush(self) -> None:
        """FLUSHALL on every master (between tests sharing the cluster)."""
        for master in self.masters():
            with _client(master.port) as client:
                client.flushall()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _all_ok(self) -> bool:
        for node in self.alive():
            with _client(node.port) as client:
                info = client.execute_command("CLUSTER", "INFO").decode()
            if "cluster_state:ok" not in info:
                return False
        return True


def start_redis_cluster(masters: int = 3, replicas: int = 1, host: str = "127.0.0.1") -> RedisClusterProcesses:
    """Start and join a cluster; ready (``cluster_state:ok`` everywhere) on return.
    ``host``: an address of this machine the nodes also listen on (their cluster bus
    too) and announce, for clients that cannot reach this machine's 127.0.0.1."""
    workdir = Path(tempfile.mkdtemp(prefix="mlgate-redis-cluster-"))
    nodes: list[ManagedProcess] = []
    cluster = RedisClusterProcesses(nodes, workdir, host)
    addresses = ["127.0.0.1"] if host == "127.0.0.1" else ["127.0.0.1", host]
    try:
        for _ in range(masters * (1 + replicas)):
            port = _node_port(addresses)
            node_dir = workdir / str(port)
            node_dir.mkdir()
            argv = [
                *redis_command(port),
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(node_dir / "nodes.conf"),
                "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                # A replica may take over however long it was cut off (tests kill masters).
                "--cluster-replica-validity-factor", "0",
                "--dir", str(node_dir),
                # Replaces redis_command's 127.0.0.1 (which wait_for_port still reaches).
                "--bind", *addresses,
                "--cluster-announce-ip", host,
                # Without a password, protected mode refuses clients off the loopback.
                "--protected-mode", "yes" if host == "127.0.0.1" else "no",
            ]
            node = ManagedProcess(argv, port)
            nodes.append(node)
            node.start()
        subprocess.run(
            ["redis-cli", "--cluster", "create", *cluster.seeds,
             "--cluster-replicas", str(replicas), "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60,
        )
        cluster.wait_for_failover(masters=masters)
        _wait_for_replicas(cluster, masters * replicas)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait_for_replicas(cluster: RedisClusterProcesses, expected: int, timeout_s: float = 30.0) -> None:
    """Until every replica has synced with its master (so a failover can promote it)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        synced = 0
        for node in cluster.alive():
            with _client(node.port) as client:
                info = client.info("replication")
            if info.get("role") == "slave" and info.get("master_link_status") == "up":
                synced += 1
        if synced >= expected:
            return
        time.sleep(0.1)
    raise TimeoutError("the cluster's replicas did not sync")


def _node_port(addresses: list[str]) -> int:
    """A port free together with its cluster bus port (+10000), both below the range
    outgoing connections take their source ports from (32768 up)."""
    for _ in range(200):
        port = _PORTS.randrange(20000, 22768)
        if all(
            _bindable(address, candidate)
            for address in addresses
            for candidate in (port, port + BUS_PORT_OFFSET)
        ):
            return port
    raise RuntimeError("no free port pair for a cluster node")


def _bindable(address: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((address, port))
        except OSError:
            return False
    return True


def _client(port: int) -> redis.Redis:
    return redis.Redis(port=port, socket_timeout=2, socket_connect_timeout=2)
