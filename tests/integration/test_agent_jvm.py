"""The agent's loop driving the REAL servers: ProcessServices, render and the real ZooKeeper 3.8.7 / Kafka
3.9.2 archives from the artifacts cache, installed from "S3" with their sha256 checked. EC2, IMDS, the NIC and
the disks are the in-memory fakes (no namespace, no loop device here); files are real, under a temp dir.
A one-slot cluster on 127.0.0.x only (loopback: nothing leaves this machine), so ZooKeeper runs standalone.

Asserts the sentences of a real boot (ZooKeeper first, Kafka once it serves, broker registered), a crash of
Kafka (SIGKILL) restarted by the loop after its backoff, and the agent's shutdown (what SIGTERM runs):
Kafka's controlled shutdown, then ZooKeeper, no JVM left.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import time
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from kafka_asg.agent.fakes import FakeCloud, FakeHost, FakeImds, FakeWorld
from kafka_asg.agent.loop import Agent, AgentSettings, SystemClock
from kafka_asg.agent.ports import InstanceIdentity
from kafka_asg.agent.servers import ProcessServices
from kafka_asg.config import ClusterConfig, Ports, Slot, Subnet, seed_config
from kafka_asg.paths import AgentPaths, CachePaths
from kafka_asg.retry import wait_until

pytestmark = pytest.mark.jvm

ARTIFACTS = CachePaths.default().artifacts_dir
ZK_ARCHIVE = ARTIFACTS / "apache-zookeeper-3.8.7-bin.tar.gz"
KAFKA_ARCHIVE = ARTIFACTS / "kafka_2.13-3.9.2.tgz"


class RealFilesHost(FakeHost):
    """The fake NIC (EC2 state), but real files: ZooKeeper and Kafka read myid and write meta.properties."""

    def read_file(self, path: Path) -> str | None:
        try:
            return path.read_text()
        except FileNotFoundError:
            return None

    def write_file(self, path: Path, data: str | bytes, mode: int = 0o644, *, durable: bool = True) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        path.chmod(mode)


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def one_slot_cluster(tmp: Path, ip: IPv4Address) -> ClusterConfig:
    seed = seed_config()
    subnet = Subnet("eu-west-1b", IPv4Network(f"{ip}/32", strict=False).supernet(new_prefix=28))
    zk_conf, kafka_conf = tmp / "zookeeper.config", tmp / "kafka.config"
    zk_conf.write_text(f"tickTime=2000\ndataDir={tmp}/zk-data\ndataLogDir={tmp}/zk-txlog\ninitLimit=15\nsyncLimit=2\n")
    kafka_conf.write_text(
        f"log.dir={tmp}/kafka-log\nnum.partitions=1\noffsets.topic.replication.factor=1\n"
        "zookeeper.connection.timeout.ms=10000\n"
    )
    host = str(ip)
    return replace(
        seed,
        subnets=(subnet,),
        slots=(Slot(1, "eu-west-1b", ip, subnet),),
        ports=Ports(free_port(host), free_port(host), free_port(host), free_port(host)),
        volumes="per-instance",
        zookeeper_config=zk_conf,
        kafka_config=kafka_conf,
    )


@pytest.mark.skipif(not (ZK_ARCHIVE.exists() and KAFKA_ARCHIVE.exists()), reason="server archives not built yet")
def test_agent_runs_real_zookeeper_then_kafka(tmp_path: Path) -> None:
    ip = IPv4Address(f"127.0.0.{random.randint(2, 250)}")
    cfg = one_slot_cluster(tmp_path, ip)
    world = FakeWorld()
    world.add_eni(cfg.name, 1, str(ip), "subnet-1b")
    world.instances["i-jvm"] = "running"
    world.add_instance_volumes(cfg.name, "i-jvm", "eu-west-1b")  # per-instance mode: the launch template's
    world.put_with_manifest(
        cfg.bucket,
        {
            cfg.zookeeper.archive_key: ZK_ARCHIVE.read_bytes(),
            cfg.kafka.archive_key: KAFKA_ARCHIVE.read_bytes(),
        },
    )
    identity = InstanceIdentity(
        "i-jvm", "eu-west-1", "eu-west-1b", "euw1-az2", "02:00:00:aa:00:01", "subnet-1b",
        cfg.slots[0].subnet.cidr, "vpc-1", IPv4Address("127.0.0.1"),
    )  # fmt: skip
    paths = AgentPaths(root=tmp_path / "root")
    services = ProcessServices(paths)
    agent = Agent(
        cfg,
        imds=FakeImds(identity),
        cloud=FakeCloud(world),
        host=RealFilesHost(world, "i-jvm"),
        services=services,
        paths=paths,
        clock=SystemClock(),
        settings=AgentSettings(kafka_stop_timeout=60, zookeeper_stop_timeout=20),
    )
    serving = "no action: zookeeper standalone, broker 1 registered"
    sentences: list[str] = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            sentences.append(agent.run_cycle())
            if sentences[-1] == serving:
                break
            time.sleep(0 if agent.progressed else 0.5)
        assert sentences[-1] == serving, "\n".join(sentences)
        assert sentences[:3] == [
            f"claimed eni-0001 (slot 1, {ip})",
            "protecting i-jvm from scale-in: it holds slot 1 (eni-0001)",
            f"configuring ens6 (eni-0001): {ip}/28, policy routing via table 10001",
        ]
        # Three filesystems, one step each, then one step mounts all three.
        assert [s.split(" on ")[0] for s in sentences[3:6]] == ["making a filesystem"] * 3
        assert sentences[6].startswith("mounting ") and sentences[6].count(" at /") == 3
        assert sentences[7:10] == [
            "marking vol-i-jvm-zk-data as event-servers slot 1 zk-data",
            "marking vol-i-jvm-zk-txlog as event-servers slot 1 zk-txlog",
            "marking vol-i-jvm-kafka-log as event-servers slot 1 kafka-log",
        ]
        assert sentences[10] == "installing zookeeper 3.8.7"
        assert sentences.index("installing kafka 3.9.2") > sentences.index(
            f"starting zookeeper (server.1, {ip}:{cfg.ports.zk_client})"
        )
        start_zk = sentences.index(f"starting zookeeper (server.1, {ip}:{cfg.ports.zk_client})")
        start_kafka = sentences.index(f"starting kafka (broker 1, {ip}:{cfg.ports.kafka})")
        assert start_zk < start_kafka
        assert (tmp_path / "zk-data" / "myid").read_text() == "1\n"
        assert "broker.id=1" in (tmp_path / "kafka-log" / "meta.properties").read_text()

        # Kafka dies: the loop notices, waits out the backoff, restarts it, and the broker registers again.
        kafka_pid = services.state("kafka").pid
        assert kafka_pid is not None
        os.killpg(kafka_pid, signal.SIGKILL)  # a crash: its own session, so the group id is its pid
        wait_until("kafka to die", lambda: not services.state("kafka").running, deadline=30, interval=0.1)
        more: list[str] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            more.append(agent.run_cycle())
            if more[-1] == serving:
                break
            time.sleep(0.5)
        assert more[-1] == serving, "\n".join(more)
        # SIGKILL closed no ZooKeeper session: the dead broker's /brokers/ids/1 lives until the session times
        # out, and a new broker 1 would die of NodeExists meanwhile. So the agent waits for it, then restarts.
        leftover = (
            "waiting: /brokers/ids/1 still holds a previous broker 1's registration (its zookeeper session has not "
            "expired); starting kafka once it is gone"
        )
        assert leftover in more, "\n".join(more)
        restart = f"restarting kafka (broker 1, {ip}:{cfg.ports.kafka}; it exited 1x)"
        assert restart in more, "\n".join(more)
        assert more.index(restart) > max(i for i, s in enumerate(more) if s == leftover)
        assert services.state("kafka").pid != kafka_pid
    finally:
        shutdown = agent.shutdown()
    assert shutdown == "stopping: kafka controlled shutdown, then zookeeper"
    assert not services.state("kafka").running
    assert not services.state("zookeeper").running
