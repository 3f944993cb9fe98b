"""Whole boots of the agent against the in-memory fakes (agent/fakes.py): fresh boot, reboot, replacement,
surplus, refusal, races, crashes, fencing, shutdown. Each test asserts the sentences ``run_cycle`` returns."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from kafka_asg.agent.fakes import FakeClock, FakeCloud, FakeHost, FakeImds, FakeServices, FakeWorld
from kafka_asg.agent.loop import Agent, AgentSettings, Prefetch
from kafka_asg.agent.ports import InstanceIdentity, ServerName
from kafka_asg.agent.snapshot import MARKER_NAME
from kafka_asg.agent.status import health, read_status
from kafka_asg.config import VOLUME_ROLES, ClusterConfig, seed_config
from kafka_asg.errors import CloudError, Unavailable
from kafka_asg.paths import AgentPaths

CFG: ClusterConfig = seed_config()
BUCKET = CFG.bucket
SUBNETS = {1: ("subnet-1a", "eu-west-1a", "10.0.0.48/28"), 2: ("subnet-1b", "eu-west-1b", "10.0.0.16/28")}
SUBNETS[3] = ("subnet-1c", "eu-west-1c", "10.0.0.32/28")
SERVING = "no action: zookeeper follower, broker 2 registered"
KAFKA_LOG = "/var/lib/kafka/event-log"


def make_world() -> FakeWorld:
    world = FakeWorld()
    for slot in CFG.slots:
        subnet_id, az, _ = SUBNETS[slot.number]
        world.add_eni(CFG.name, slot.number, str(slot.ip), subnet_id)
        for role in VOLUME_ROLES:
            world.add_volume(CFG.name, slot.number, role, az)
    world.put_with_manifest(
        BUCKET,
        {
            CFG.zookeeper.archive_key: b"zookeeper archive bytes",
            CFG.kafka.archive_key: b"kafka archive bytes",
            "zookeeper.config": CFG.zookeeper_config.read_bytes(),
            "kafka.config": CFG.kafka_config.read_bytes(),
        },
    )
    return world


@dataclass
class Node:
    agent: Agent
    host: FakeHost
    services: FakeServices
    imds: FakeImds
    paths: AgentPaths
    instance_id: str


def boot(
    world: FakeWorld,
    tmp: Path,
    instance_id: str,
    clock: FakeClock,
    slot_subnet: int = 2,
    *,
    cfg: ClusterConfig = CFG,
    manifest: bytes | None = None,
) -> Node:
    """A new instance (or a reboot: a new process, new OS state, same world) in the slot's subnet."""
    subnet_id, az, cidr = SUBNETS[slot_subnet]
    world.instances[instance_id] = "running"
    identity = InstanceIdentity(
        instance_id=instance_id,
        region="eu-west-1",
        az=az,
        az_id=f"euw1-az{slot_subnet}",
        mac=f"02:00:00:aa:00:{len(world.instances):02x}",
        subnet_id=subnet_id,
        subnet_cidr=IPv4Network(cidr),
        vpc_id="vpc-1",
        local_ipv4=IPv4Address("10.0.0.20"),
    )
    host = FakeHost(world, instance_id)
    services = FakeServices(clock.monotonic)
    imds = FakeImds(identity)
    paths = AgentPaths(root=tmp / instance_id)

    def kafka_writes_meta() -> None:  # Kafka writes meta.properties on its first start
        meta = Path(KAFKA_LOG) / "meta.properties"
        if host.read_file(meta) is None:
            host.write_file(meta, "version=0\nbroker.id=2\ncluster.id=Clu5terId\n")

    services.meta_writer = kafka_writes_meta
    agent = Agent(
        cfg,
        imds=imds,
        cloud=FakeCloud(world),
        host=host,
        services=services,
        paths=paths,
        clock=clock,
        settings=AgentSettings(),
        manifest=manifest,
    )
    return Node(agent, host, services, imds, paths, instance_id)


def run(node: Node, clock: FakeClock, until: str, max_cycles: int = 40) -> list[str]:
    sentences = []
    for _ in range(max_cycles):
        sentences.append(node.agent.run_cycle())
        clock.advance(1.0)
        if sentences[-1] == until:
            return sentences
    raise AssertionError(f"never reached {until!r}; sentences:\n" + "\n".join(sentences))


def volume_file(world: FakeWorld, slot: int, role: str, name: str) -> str | None:
    vol = world.volumes[f"vol-{slot}{role.replace('-', '')}"]
    data = vol.files.get(name)
    return data.decode() if data is not None else None


@pytest.fixture
def world() -> FakeWorld:
    return make_world()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# ------------------------------------------------------------------------------ fresh boot


def test_fresh_boot_reaches_serving(world: FakeWorld, clock: FakeClock, tmp_path: Path) -> None:
    node = boot(world, tmp_path, "i-first", clock)
    sentences = run(node, clock, SERVING)
    assert sentences == [
        "claimed eni-0002 (slot 2, 10.0.0.21)",
        "attaching slot 2 volumes: vol-2zkdata (zk-data), vol-2zktxlog (zk-txlog), vol-2kafkalog (kafka-log); "
        "protecting i-first from scale-in: it holds slot 2 (eni-0002)",
        "configuring ens7 (eni-0002): 10.0.0.21/28, policy routing via table 10001",
        "making a filesystem on /dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol2zkdata (vol-2zkdata, zk-data): "
        "it has none",
        "making a filesystem on /dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol2zktxlog (vol-2zktxlog, "
        "zk-txlog): it has none",
        "making a filesystem on /dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol2kafkalog (vol-2kafkalog, "
        "kafka-log): it has none",
        "mounting /dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol2zkdata (vol-2zkdata, zk-data, ext4) at "
        "/var/lib/zookeeper/data; /dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol2zktxlog (vol-2zktxlog, "
        "zk-txlog, ext4) at /var/lib/zookeeper/transaction-log; "
        "/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol2kafkalog (vol-2kafkalog, kafka-log, ext4) at "
        "/var/lib/kafka/event-log",
        "marking vol-2zkdata as event-servers slot 2 zk-data",
        "marking vol-2zktxlog as event-servers slot 2 zk-txlog",
        "marking vol-2kafkalog as event-servers slot 2 kafka-log",
        "installing zookeeper 3.8.7",
        "rendering zoo.cfg, myid and server.properties for slot 2",
        "starting zookeeper (server.2, 10.0.0.21:2181)",
        "installing kafka 3.9.2",
        "starting kafka (broker 2, 10.0.0.21:9095)",
        "recording kafka cluster.id Clu5terId in the kafka-log volume's marker",
        SERVING,
    ]
    assert node.services.events == ["install zookeeper", "start zookeeper", "install kafka", "start kafka"]
    assert node.host.mkfs_calls == ["vol-2zkdata", "vol-2zktxlog", "vol-2kafkalog"]
    assert volume_file(world, 2, "zk-data", "myid") == "2\n"
    assert volume_file(world, 2, "kafka-log", "lost+found/") is None  # Kafka refuses it in a log dir
    assert json.loads(volume_file(world, 2, "kafka-log", MARKER_NAME) or "") == {
        "version": 1,
        "cluster": "event-servers",
        "slot": 2,
        "role": "kafka-log",
        "kafka_cluster_id": "Clu5terId",
    }
    zoo = (node.paths.config_dir / "zoo.cfg").read_text()
    assert "server.2=10.0.0.21:2888:3888" in zoo
    props = (node.paths.config_dir / "server.properties").read_text()
    assert "broker.id=2" in props
    assert "broker.rack=euw1-az2" in props
    assert world.protected == {"i-first": True}
    status = read_status(node.paths.status_file)
    assert status is not None
    assert (status.state, status.slot, status.reason) == ("serving", 2, SERVING)
    assert health(status, clock.time()).healthy
    tags = world.tags["i-first"]
    # Each boot step chained into the next at once and reported nothing; the first cycle that waits reported all.
    assert world.calls.count("report") == 1
    assert tags["kafka-asg:state"] == "serving"
    assert tags["kafka-asg:slot"] == "2"
    assert tags["kafka-asg:zk-mode"] == "follower"
    assert tags["kafka-asg:broker"] == "registered"
    assert tags["kafka-asg:decision"] == SERVING


def test_state_changes_are_logged_with_the_agents_cost(
    world: FakeWorld, clock: FakeClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kafka_asg.agent.loop")
    node = boot(world, tmp_path, "i-first", clock)
    run(node, clock, SERVING)
    changes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("state ")]
    assert len(changes) == 1
    assert re.fullmatch(r"state booting -> serving after \d+\.\d\ds \(agent started \d+\.\d\ds ago, "
                        r"its CPU so far 0\.00s, reaped children 0\.00s\)", changes[0])  # fmt: skip


def test_reboot_reformats_nothing_and_keeps_ids(world: FakeWorld, clock: FakeClock, tmp_path: Path) -> None:
    first = boot(world, tmp_path, "i-first", clock)
    run(first, clock, SERVING)
    marker_before = volume_file(world, 2, "kafka-log", MARKER_NAME)
    # Reboot: same instance and disks, the OS forgot mounts and NIC config, the servers are not running.
    again = boot(world, tmp_path, "i-first", clock)
    sentences = run(again, clock, SERVING)
    assert not any(s.startswith(("making a filesystem", "marking", "claimed")) for s in sentences)
    assert again.host.mkfs_calls == []
    assert volume_file(world, 2, "zk-data", "myid") == "2\n"
    assert volume_file(world, 2, "kafka-log", "meta.properties") == "version=0\nbroker.id=2\ncluster.id=Clu5terId\n"
    assert volume_file(world, 2, "kafka-log", MARKER_NAME) == marker_before
    assert not any(s.startswith("protecting") for s in sentences)  # once per instance (semaphore)
    assert [c for c in world.calls if c.startswith("set_scale_in")] == ["set_scale_in_protection i-first True"]


def test_agent_restart_with_servers_still_running_starts_nothing(
    world: FakeWorld, clock: FakeClock, tmp_path: Path
) -> None:
    first = boot(world, tmp_path, "i-first", clock)
    run(first, clock, SERVING)
    restarted = Agent(
        CFG,
        imds=first.imds,
        cloud=FakeCloud(world),
        host=first.host,
        services=first.services,
        paths=first.paths,
        clock=clock,
    )
    node = Node(restarted, first.host, first.services, first.imds, first.paths, "i-first")
    sentences = run(node, clock, SERVING)
    assert sentences[-1] == SERVING
    assert first.services.events.count("start zookeeper") == 1
    assert first.services.events.count("start kafka") == 1


def test_replacement_takes_over_the_slot_identity(world: FakeWorld, clock: FakeClock, tmp_path: Path) -> None:
    run(boot(world, tmp_path, "i-first", clock), clock, SERVING)
    world.terminate("i-first")
    new = boot(world, tmp_path, "i-new", clock)
    sentences = run(new, clock, SERVING)
    assert sentences[0] == "claimed eni-0002 (slot 2, 10.0.0.21)"
    assert new.host.mkfs_calls == []
    assert volume_file(world, 2, "zk-data", "myid") == "2\n"
    assert "cluster.id=Clu5terId" in (volume_file(world, 2, "kafka-log", "meta.properties") or "")


def test_a_predecessors_leftover_registration_is_not_taken_for_ours(
    world: FakeWorld, clock: FakeClock, tmp_path: Path
) -> None:
    run(boot(world, tmp_path, "i-first", clock), clock, SERVING)
    world.terminate("i-first")  # a power cut: its ZooKeeper session, and /brokers/ids/2, outlive it for 18 s
    new = boot(world, tmp_path, "i-new", clock)
    expires = clock.monotonic() + 18
    new.services.leftover_registration = (clock.monotonic() - 30, expires)
    new.services.registration_delay = 2.5
    sentences = run(new, clock, SERVING)
    leftover = (
        "waiting: /brokers/ids/2 still holds a previous broker 2's registration (its zookeeper session has not "
        "expired); starting kafka once it is gone"
    )
    assert leftover in sentences
    started = sentences.index("starting kafka (broker 2, 10.0.0.21:9095)")
    assert sentences.index(leftover) < started  # kafka is not started into NodeExists
    kafka_started = new.services.servers["kafka"].started_at
    assert kafka_started is not None and kafka_started >= expires
    assert sentences[started + 1 : started + 4] == [
        "waiting: broker 2 not registered in zookeeper yet (zookeeper follower)",
        "waiting: broker 2 not registered in zookeeper yet (zookeeper follower)",
        "no action: zookeeper follower, broker 2 registered",
    ]


def test_a_registration_older_than_the_running_kafka_is_not_its_own(
    world: FakeWorld, clock: FakeClock, tmp_path: Path
) -> None:
    """Kafka already running (e.g. restarted by the agent) while a predecessor's node lingers: not registered."""
    node = boot(world, tmp_path, "i-first", clock)
    run(node, clock, SERVING)
    node.services.leftover_registration = (clock.monotonic() - 30, clock.monotonic() + 10)
    assert node.agent.run_cycle() == "waiting: broker 2 not registered in zookeeper yet (zookeeper follower)"


def test_waits_on_its_own_servers_reuse_ec2_reads(world: FakeWorld, clock: FakeClock, tmp_path: Path) -> None:
    node = boot(world, tmp_path, "i-first", clock)
    node.services.zk_mode_when_running = "not serving"  # its ZooKeeper still joining the quorum
    run(node, clock, "installing kafka 3.9.2")  # while ZooKeeper joins
    before = world.calls.count("slot_enis")
    for _ in range(5):
        assert node.agent.run_cycle() == "waiting: zookeeper quorum not formed (mode: not serving)"
        assert node.agent.interval == AgentSettings().soon_interval
        clock.advance(0.2)
    assert world.calls.count("slot_enis") == before  # the boot steps' read, reused across 1 s of 0.2 s waits
    clock.advance(AgentSettings().reads_max_age)
    for _ in range(3):
        assert node.agent.run_cycle() == "waiting: zookeeper quorum not formed (mode: not serving)"
        clock.advance(0.2)
    assert world.calls.count("slot_enis") == before + 1  # at most a serving cycle old: read again, once


def test_a_volume_being_plugged_is_looked_for_every_50_ms_for_a_second_then_at_the_soon_pace(
    world: FakeWorld, clock: FakeClock, tmp_path: Path
) -> None:
    node = boot(world, tmp_path, "i-first", clock)
    node.host.plugging.add("vol-2zkdata")
    waiting = "waiting: volume vol-2zkdata (zk-data) is not visible under /dev/disk/by-id yet"
    run(node, clock, "configuring ens7 (eni-0002): 10.0.0.21/28, policy routing via table 10001")
    reports = [c for c in world.calls if c.startswith("report")]
    assert node.agent.run_cycle() == waiting
    settings = AgentSettings()
    intervals = [node.agent.interval]
    describes = world.calls.count("slot_volumes")
    started = clock.monotonic()
    while clock.monotonic() < started + 1.5:  # well past the fast second
        clock.advance(intervals[-1])
        assert node.agent.run_cycle() == waiting
        intervals.append(node.agent.interval)
        if clock.monotonic() < started + settings.device_fast_seconds:
            # No CreateTags round trip between two 50 ms looks: the tags wait for a slower wait.
            assert [c for c in world.calls if c.startswith("report")] == reports
    assert len([c for c in world.calls if c.startswith("report")]) == len(reports) + 1
    assert intervals[0] == settings.device_interval
    assert set(intervals[: int(settings.device_fast_seconds / settings.device_interval) - 1]) == {0.05}
    assert intervals[-1] == settings.soon_interval
    assert world.calls.count("slot_volumes") - describes <= 3  # EC2 reads reused across the waits
    node.host.plugging.clear()
    clock.advance(intervals[-1])
    assert node.agent.run_cycle().startswith("making a filesystem on ")
    assert node.agent.interval == settings.booting_interval  # the next wait starts at its own pace


def test_the_pause_of_a_volume_wait_ends_when_the_volumes_show_up(
    world: FakeWorld, clock: FakeClock, tmp_path: Path
) -> None:
    node = boot(world, tmp_path, "i-first", clock)
    node.host.plugging.add("vol-2zkdata")
    run(node, clock, "configuring ens7 (eni-0002): 10.0.0.21/28, policy routing via table 10001")
    assert node.agent.run_cycle() == "waiting: volume vol-2zkdata (zk-data) is not visible under /dev/disk/by-id yet"
    node.agent.settings = replace(node.agent.settings, device_interval=30.0)  # a pause that would outlast the test
    threading.Timer(0.05, node.host.plugging.clear).start()  # EC2 plugs it meanwhile
    started = time.monotonic()
    assert node.agent.pause() is False  # not woken: it ended because the volume showed up
    assert time.monotonic() - started < 5.0
    assert node.agent.run_cycle().startswith("making a filesystem on ")


def test_its_own_boot_steps_reuse_ec2_reads_its_claim_and_attach_read_what_they_changed(
    world: FakeWorld, clock: FakeClock, tmp_path: Path
) -> None:
    node = boot(world, tmp_path, "i-first", clock)
    cycles: list[tuple[str, int, int]] = []  # (sentence, slot ENI describes, slot volume describes in that cycle)
    while not cycles or not cycles[-1][0].startswith("starting zookeeper"):
        assert len(cycles) < 40, cycles
        enis, volumes = world.calls.count("slot_enis"), world.calls.count("slot_volumes")
        sentence = node.agent.run_cycle()
        cycles.append((sentence, world.calls.count("slot_enis") - enis, world.calls.count("slot_volumes") - volumes))
    sentences = [s for s, _, _ in cycles]
    claim = next(i for i, s in enumerate(sentences) if s.startswith("claimed "))
    assert cycles[claim][1:] == (2, 0)  # looked for a free ENI, then read the attachment back
    after_claim = claim + 1
    assert sentences[after_claim] == (
        "attaching slot 2 volumes: vol-2zkdata (zk-data), vol-2zktxlog (zk-txlog), vol-2kafkalog (kafka-log); "
        "protecting i-first from scale-in: it holds slot 2 (eni-0002)"
    )
    assert cycles[after_claim][1:] == (0, 1)  # the claim's read-back of the ENIs is reused; the volumes are new
    after_attach = after_claim + 1
    assert cycles[after_attach][1:] == (0, 1)  # the attach changed the volumes only
    # NIC, mkfs, mount, marker, install, render, start: EC2 is not described again (the clock stood still here).
    assert [c[1:] for c in cycles[after_attach + 1 :]] == [(0, 0)] * (len(cycles) - after_attach - 1)


def test_the_wait_for_its_broker_is_woken_by_the_registration(
    world: FakeWorld, clock: FakeClock, tmp_path: Path
) -> None:
    node = boot(world, tmp_path, "i-first", clock)
    node.services.registration_delay = 5.0
    run(node, clock, "starting kafka (broker 2, 10.0.0.21:9095)")
    assert node.agent.run_cycle() == "waiting: broker 2 not registered in zookeeper yet (zookeeper follower)"
    # Polled only as a fallback: the registration's watch ends the pause at once.
    assert node.agent.interval == AgentSettings().watched_interval
    assert node.services.wake is not None
    node.services.wake()
    started = time.monotonic()
    assert node.agent.pause() is True
    assert time.monotonic() - started < 0.5
    assert node.agent.pause(0.05) is False  # the wake was used up: the next pause is a pause


def test_replacement_waits_while_the_old_holder_shuts_down(world: FakeWorld, clock: FakeClock, tmp_path: Path) -> None:
    run(boot(world, tmp_path, "i-first", clock), clock, SERVING)
    world.instances["i-first"] = "shutting-down"
    new = boot(world, tmp_path, "i-new", clock)
    assert new.agent.run_cycle() == (
        "waiting for eni-0002 (slot 2, 10.0.0.21): holder i-first is shutting-down (waited 0s of 300s)"
    )
    clock.advance(30)
    assert new.agent.run_cycle() == (
        "waiting for eni-0002 (slot 2, 10.0.0.21): holder i-first is shutting-down (waited 30s of 300s)"
    )
    assert new.agent.state == "standby"
    # Looked at again at the boot pace (0.5 s), not the standby heartbeat (5 s): the slot frees any moment.
    assert (new.agent.progressed, new.agent.interval) == (False, AgentSettings().booting_interval)
    world.terminate("i-first")
    assert new.agent.run_cycle() == "claimed eni-0002 (slot 2, 10.0.0.21)"
    assert new.agent.progressed  # a claim is a step done: the next boot step follows at once


# ------------------------------------------------------------------------------ surplus, races


def test_surplus_instance_never_starts_servers(world: FakeWorld, clock: FakeClock, tmp_path: Path) -> None:
    run(boot(world, tmp_path, "i-first", clock), clock, SERVING)
    surplus = boot(world, tmp_path, "i-surplus", clock)
    for _ in range(10):
        assert surplus.agent.run_cycle() == (
            "standing by: every slot of subnet-1b is held by a live instance (slot 2: i-first)"
        )
        assert surplus.agent.interval == AgentSettings().serving_interval
        clock.advance(5)
    assert surplus.services.events == []
    assert "i-surplus" not in world.protected
    status = read_status(surplus.paths.status_file)
    assert status is not None
    assert status.state == "standby"
    assert not health(status, clock.time()).healthy
    assert world.tags["i-surplus"]["kafka-asg:state"] == "standby"
    # The slot frees (the holder is gone): the standby instance takes it.
    world.terminate("i-first")
    assert run(surplus, clock, SERVING)[0] == "claimed eni-0002 (slot 2, 10.0.0.21)"


def test_lost_attach_race_then_standby(world: FakeWorld, clock: FakeClock, tmp_path: Path) -> None:
    node = boot(world, tmp_path, "i-late", clock)
    world.instances["i-winner"] = "running"
    cloud = node.agent.cloud
    assert isinstance(cloud, FakeCloud)
    cloud.race["eni-0002"] = "i-winner"
    assert (
        node.agent.run_cycle() == "lost the race for eni-0002 (slot 2, 10.0.0.21) to i-winner; re-checking next cycle"
    )
    assert not node.agent.progressed
    assert node.agent.run_cycle() == (
        "standing by: every slot of subnet-1b is held by a live instance (slot 2: i-winner)"
    )
    assert node.services.events == []


def test_lost_volume_race_keeps_the_slot_and_retries(world: FakeWorld, clock: FakeClock, tmp_path: Path) -> None:
    node = boot(world, tmp_path, "i-first", clock)
    world.instances["i-other"] = "running"
    cloud = node.agent.cloud
    assert isinstance(cloud, FakeCloud)
    cloud.race["vol-2zktxlog"] = "i-other"
    sentences = [node.agent.run_cycle() for _ in range(3)]
    assert sentences[1] == "waiting: vol-2zktxlog was attached by i-other first; keeping the slot, retrying next cycle"
    # All three were tried at once: the two that were free are ours.
    assert [world.volumes[v].attached_to for v in ("vol-2zkdata", "vol-2kafkalog")] == ["i-first", "i-first"]
    # The protection went with them: the wait for the held one is a slot holder's wait.
    assert world.protected == {"i-first": True}
    assert sentences[2] == (
        "waiting: vol-2zktxlog (slot 2 zk-txlog) is attached to i-other (running); "
        "not starting without all three volumes"
    )
    assert world.enis["eni-0002"].attached_to == "i-first"  # nothing released silently
    world.terminate("i-other")
    assert run(node, clock, SERVING)[-1] == SERVING


# ------------------------------------------------------------------------------ refusal


def test_volume_with_another_clusters_meta_properties_is_refused(
    world: FakeWorld, clock: FakeClock, tmp_path: Path
) -> None:
    foreign = world.volumes["vol-2kafkalog"]
    foreign.filesystem = "ext4"
    foreign.files = {"meta.properties": b"version=0\nbroker.id=2\ncluster.id=ForeignCluster\n"}
    node = boot(world, tmp_path, "i-first", clock)
    reason = (
        "refused: vol-2kafkalog (kafka-log) has no kafka-asg marker but holds kafka data (meta.properties "
        "broker.id=2 cluster.id=ForeignCluster); not starting zookeeper or kafka"
    )
    sentences = run(node, clock, reason)
    assert node.agent.run_cycle() == reason  # and stays refused
    assert "vol-2kafkalog" not in node.host.mkfs_calls
    assert node.services.events == []
    status = read_status(node.paths.status_file)
    assert status is not None
    assert (status.state, status.reason) == ("refused", reason)
    assert world.tags["i-first"]["kafka-asg:state"] == "refused"
    assert len(sentences) > 1


# ------------------------------------------------------------------------------ supervise, fence, stop


def test_crashed_kafka_restarts_with_backoff(world: FakeWorld, clock: FakeClock, tmp_path: Path) -> None:
    node = boot(world, tmp_path, "i-first", clock)
    run(node, clock, SERVING)
    node.services.crash("kafka")
    assert node.agent.run_cycle() == "waiting: kafka exited (1x); restarting in 2s (backoff)"
    clock.advance(2)
    assert node.agent.run_cycle() == "restarting kafka (broker 2, 10.0.0.21:9095; it exited 1x)"
    assert node.agent.run_cycle() == SERVING
    assert node.services.events[-1] == "start kafka"


def test_lost_fence_stops_servers_at_once(world: FakeWorld, clock: FakeClock, tmp_path: Path) -> None:
    node = boot(world, tmp_path, "i-first", clock)
    run(node, clock, SERVING)
    world.instances["i-thief"] = "running"
    world.enis["eni-0002"].attached_to = "i-thief"
    assert node.agent.run_cycle() == (
        "fenced: eni-0002 (slot 2) is no longer attached to this instance (holder: i-thief); "
        "stopping kafka and zookeeper"
    )
    assert node.services.events[-2:] == ["stop kafka", "stop zookeeper"]
    assert world.protected["i-first"] is False
    assert node.agent.run_cycle() == (
        "standing by: every slot of subnet-1b is held by a live instance (slot 2: i-thief)"
    )


def test_shutdown_stops_kafka_then_zookeeper(world: FakeWorld, clock: FakeClock, tmp_path: Path) -> None:
    node = boot(world, tmp_path, "i-first", clock)
    run(node, clock, SERVING)
    assert node.agent.shutdown() == "stopping: kafka controlled shutdown, then zookeeper"
    assert node.services.events[-2:] == ["stop kafka", "stop zookeeper"]
    status = read_status(node.paths.status_file)
    assert status is not None
    assert status.state == "stopping"
    assert world.tags["i-first"]["kafka-asg:state"] == "stopping"


def test_warm_pool_claims_nothing(world: FakeWorld, clock: FakeClock, tmp_path: Path) -> None:
    node = boot(world, tmp_path, "i-warm", clock)
    node.imds.lifecycle = "Warmed:Stopped"
    assert node.agent.run_cycle() == "warm pool (Warmed:Stopped): not claiming a slot; stopping the agent"
    assert node.agent.halted
    assert node.agent.run_forever() == 0
    assert world.enis["eni-0002"].attached_to is None


def test_cloud_unavailable_means_retry_next_cycle(world: FakeWorld, clock: FakeClock, tmp_path: Path) -> None:
    node = boot(world, tmp_path, "i-first", clock)
    run(node, clock, SERVING)
    cloud = node.agent.cloud
    assert isinstance(cloud, FakeCloud)
    cloud.fail_next.append(Unavailable("DescribeNetworkInterfaces: Rate exceeded (RequestLimitExceeded)"))
    assert node.agent.run_cycle() == (
        "waiting: DescribeNetworkInterfaces: Rate exceeded (RequestLimitExceeded); retrying next cycle"
    )
    assert node.agent.state == "serving"  # a transient failure does not demote the node
    assert node.services.events.count("stop kafka") == 0
    assert node.agent.run_cycle() == SERVING


def test_archive_with_wrong_sha256_is_not_installed(world: FakeWorld, clock: FakeClock, tmp_path: Path) -> None:
    world.put_object(BUCKET, CFG.kafka.archive_key, b"tampered")
    node = boot(world, tmp_path, "i-first", clock)
    sentences = [node.agent.run_cycle() for _ in range(20)]
    want = hashlib.sha256(b"tampered").hexdigest()
    assert sentences[-1].startswith(f"failed: s3://{BUCKET}/{CFG.kafka.archive_key}: sha256 {want} does not match")
    assert sentences[-1].endswith("re-run `kafka-asg up`; retrying next cycle")
    assert "install kafka" not in node.services.events
    assert not (node.paths.downloads_dir / "kafka_2.13-3.9.2.tgz").exists()
    # ZooKeeper's archive is good and ZooKeeper serves the quorum; Kafka never starts from a tampered archive.
    assert node.services.events == ["install zookeeper", "start zookeeper"]


def test_prefetch_installs_while_the_old_holder_shuts_down(world: FakeWorld, clock: FakeClock, tmp_path: Path) -> None:
    run(boot(world, tmp_path, "i-first", clock), clock, SERVING)
    world.instances["i-first"] = "shutting-down"
    new = boot(world, tmp_path, "i-new", clock)
    assert new.agent.run_cycle().startswith("waiting for eni-0002 (slot 2, 10.0.0.21): holder i-first")
    new.agent.prefetch.start()  # as the daemon does after its first cycle
    new.agent.prefetch.result("kafka")
    # Installed with no slot yet: the archives need none.
    assert new.services.events == ["install zookeeper", "install kafka"]
    world.terminate("i-first")
    sentences = run(new, clock, SERVING)
    # Installed before they were needed: no Install step (a cycle) for either.
    assert not any(s.startswith("installing ") for s in sentences)
    assert new.services.events[:3] == ["install zookeeper", "install kafka", "start zookeeper"]  # not again


def test_prefetch_failure_is_the_install_steps_then_retried(world: FakeWorld, clock: FakeClock, tmp_path: Path) -> None:
    good = world.objects[(BUCKET, CFG.kafka.archive_key)]
    world.put_object(BUCKET, CFG.kafka.archive_key, b"tampered")
    node = boot(world, tmp_path, "i-first", clock)
    node.agent.prefetch.start()
    sentences = [node.agent.run_cycle() for _ in range(20)]
    failed = [s for s in sentences if s.startswith("failed:")]
    assert failed and "sha256" in failed[0] and "does not match manifest.json" in failed[0]
    assert "install kafka" not in node.services.events
    world.put_object(BUCKET, CFG.kafka.archive_key, good)  # fixed: the next Install step runs it again, inline
    assert run(node, clock, SERVING)[-1] == SERVING
    assert node.services.events.count("install kafka") == 1


def test_the_manifest_read_at_start_serves_the_installs_until_one_fails(
    world: FakeWorld, clock: FakeClock, tmp_path: Path
) -> None:
    current = world.objects[(BUCKET, "manifest.json")]
    stale = json.loads(current)
    stale["files"][CFG.zookeeper.archive_key]["sha256"] = "0" * 64  # as if `kafka-asg up` ran since the agent's start
    node = boot(world, tmp_path, "i-first", clock, manifest=json.dumps(stale).encode())
    sentences = run(node, clock, SERVING)
    failed = [s for s in sentences if s.startswith("failed:")]
    assert len(failed) == 1 and "does not match manifest.json" in failed[0], sentences
    assert world.calls.count("get_object manifest.json") == 2  # read afresh from then on: zookeeper's retry, kafka
    assert node.services.events.count("install zookeeper") == 1

    other = make_world()
    fresh = boot(other, tmp_path / "fresh", "i-first", clock, manifest=other.objects[(BUCKET, "manifest.json")])
    run(fresh, clock, SERVING)
    assert other.calls.count("get_object manifest.json") == 0  # the one handed over served both installs


def test_tags_are_reported_on_change_and_as_heartbeat(world: FakeWorld, clock: FakeClock, tmp_path: Path) -> None:
    node = boot(world, tmp_path, "i-first", clock)
    run(node, clock, SERVING)  # the first cycle that waits reports
    reports_before = world.calls.count("report")
    for _ in range(11):  # 55 s of serving: nothing changed, no heartbeat due yet
        clock.advance(5)
        assert node.agent.run_cycle() == SERVING
    assert world.calls.count("report") == reports_before
    clock.advance(10)
    node.agent.run_cycle()
    assert world.calls.count("report") == reports_before + 1


# ------------------------------------------------------------------------------ the daemon


def run_forever_until_serving(node: Node, stop: Callable[[], None]) -> bool:
    """The daemon (``run_forever``, which must end with 0), and a watcher that calls ``stop`` once the agent serves,
    or after 20 s. Whether it served."""
    served = threading.Event()

    def stop_when_serving() -> None:
        deadline = time.monotonic() + 20
        while node.agent.state != "serving" and time.monotonic() < deadline:
            time.sleep(0.01)
        if node.agent.state == "serving":
            served.set()
        stop()

    watcher = threading.Thread(target=stop_when_serving)
    watcher.start()
    try:
        assert node.agent.run_forever() == 0
    finally:
        watcher.join()
    return served.is_set()


def test_run_forever_boots_then_stops_on_sigterm(world: FakeWorld, tmp_path: Path) -> None:
    real = SystemClockForTest()
    node = boot(world, tmp_path, "i-first", real)
    node.agent.settings = AgentSettings(booting_interval=0.01, serving_interval=0.01)
    before = signal.getsignal(signal.SIGTERM)
    assert run_forever_until_serving(node, lambda: os.kill(os.getpid(), signal.SIGTERM))
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is restored
    assert node.services.events[-2:] == ["stop kafka", "stop zookeeper"]
    status = read_status(node.paths.status_file)
    assert status is not None
    assert status.state == "stopping"


def test_the_daemon_downloads_the_archives_from_its_first_cycle_on_before_its_claim(
    world: FakeWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = boot(world, tmp_path, "i-first", SystemClockForTest())
    node.agent.settings = AgentSettings(booting_interval=0.01, serving_interval=0.01)
    cloud = node.agent.cloud
    downloading, claim_saw_a_download = threading.Event(), list[bool]()
    download, attach_eni = cloud.download, cloud.attach_eni

    def watched_download(bucket: str, key: str, dest: Path) -> str:
        downloading.set()
        return download(bucket, key, dest)

    def watched_attach(eni_id: str, instance_id: str, device_index: int) -> None:
        claim_saw_a_download.append(downloading.wait(5.0))
        attach_eni(eni_id, instance_id, device_index)

    monkeypatch.setattr(cloud, "download", watched_download)
    monkeypatch.setattr(cloud, "attach_eni", watched_attach)
    assert run_forever_until_serving(node, node.agent.request_stop)
    assert claim_saw_a_download == [True]  # the prefetch was under way while the first cycle claimed


class SystemClockForTest(FakeClock):
    """Real time (the daemon waits on a real Event), in FakeClock's shape for ``boot``."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


def test_per_instance_mode_boots_on_the_launch_template_volumes(clock: FakeClock, tmp_path: Path) -> None:
    world = make_world()
    node = boot(world, tmp_path, "i-first", clock)
    node.agent.cfg = replace(CFG, volumes="per-instance")
    world.add_instance_volumes(CFG.name, "i-first", "eu-west-1b")
    sentences = run(node, clock, SERVING)
    assert not any(s.startswith("attaching") for s in sentences)
    assert node.host.mkfs_calls == ["vol-i-first-zk-data", "vol-i-first-zk-txlog", "vol-i-first-kafka-log"]
    assert world.volumes["vol-2zkdata"].attached_to is None  # the slot volumes are not used in this mode
    assert world.volumes["vol-i-first-zk-data"].files["myid"] == b"2\n"


def test_unexpected_error_is_a_bug_logged_once_with_traceback(
    world: FakeWorld, clock: FakeClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = boot(world, tmp_path, "i-first", clock)
    cloud = node.agent.cloud
    assert isinstance(cloud, FakeCloud)
    for _ in range(2):
        cloud.fail_next.append(TypeError("boom"))
        assert node.agent.run_cycle() == "failed: unexpected TypeError: boom (a BUG)"
    bugs = [r for r in caplog.records if "please report it as a BUG" in r.getMessage()]
    assert len(bugs) == 1
    assert bugs[0].exc_info is not None
    assert node.agent.run_cycle() == "claimed eni-0002 (slot 2, 10.0.0.21)"  # and the loop carries on


def test_prefetch_hands_zookeeper_over_while_kafka_still_unpacks() -> None:
    kafka_may_finish = threading.Event()
    done: list[str] = []

    def step(name: ServerName) -> None:
        if name == "kafka":
            assert kafka_may_finish.wait(10)
        done.append(name)

    prefetch = Prefetch(step, ("zookeeper", "kafka"))
    prefetch.start()
    prefetch.result("zookeeper")
    assert done == ["zookeeper"]
    kafka_may_finish.set()
    prefetch.result("kafka")
    assert done == ["zookeeper", "kafka"]
    prefetch.result("kafka")  # done once
    assert done == ["zookeeper", "kafka"]


def test_prefetch_error_goes_to_the_waiting_step_then_runs_inline() -> None:
    calls: list[str] = []

    def step(name: ServerName) -> None:
        calls.append(name)
        if name == "kafka" and calls.count("kafka") == 1:
            raise CloudError("s3 said no")

    prefetch = Prefetch(step, ("zookeeper", "kafka"))
    prefetch.start()
    prefetch.result("zookeeper")
    with pytest.raises(CloudError, match="s3 said no"):
        prefetch.result("kafka")
    prefetch.result("kafka")  # the next Install step: inline, and it works now
    assert calls == ["zookeeper", "kafka", "kafka"]


def test_a_held_prefetch_step_runs_only_once_released_or_asked_for() -> None:
    unpacked: list[str] = []
    prefetch: Prefetch

    def step(name: ServerName) -> None:
        prefetch.hold(name)  # as _download_and_unpack does between the download and the unpack
        unpacked.append(name)

    prefetch = Prefetch(step, ("zookeeper", "kafka"), held=("kafka",))
    prefetch.start()
    prefetch.result("zookeeper")
    time.sleep(0.1)
    assert unpacked == ["zookeeper"]  # kafka waits: the boot steps before ZooKeeper's start run on
    prefetch.release()  # the loop's first wait
    prefetch.result("kafka")
    assert unpacked == ["zookeeper", "kafka"]

    unpacked.clear()
    prefetch = Prefetch(step, ("kafka",), held=("kafka",))
    prefetch.start()
    prefetch.result("kafka")  # an Install step releases what it waits for: no deadlock
    assert unpacked == ["kafka"]


def test_a_mountpoint_below_another_is_mounted_after_it(world: FakeWorld, clock: FakeClock, tmp_path: Path) -> None:
    # ZooKeeper's dataDir inside its dataLogDir: the zk-txlog volume must be mounted first, whatever the roles' order.
    zk_base = tmp_path / "zookeeper.config"
    zk_base.write_text(
        CFG.zookeeper_config.read_text()
        .replace("dataDir=/var/lib/zookeeper/data", "dataDir=/var/lib/zookeeper/data/snapshots")
        .replace("dataLogDir=/var/lib/zookeeper/transaction-log", "dataLogDir=/var/lib/zookeeper/data")
    )
    cfg = replace(CFG, zookeeper_config=zk_base)
    world.put_with_manifest(
        BUCKET,
        {
            CFG.zookeeper.archive_key: b"zookeeper archive bytes",
            CFG.kafka.archive_key: b"kafka archive bytes",
            "zookeeper.config": zk_base.read_bytes(),
            "kafka.config": CFG.kafka_config.read_bytes(),
        },
    )
    node = boot(world, tmp_path, "i-first", clock, cfg=cfg)
    run(node, clock, SERVING)
    order = list(node.host.mounts)
    assert order.index("vol-2zktxlog") < order.index("vol-2zkdata"), order
    assert volume_file(world, 2, "zk-data", "myid") == "2\n"  # on the inner volume, not under it on the outer one
