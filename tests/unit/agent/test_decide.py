"""The decision cascade: build a view with a factory, set one fact, assert the exact sentence (Patroni's
tests/test_ha.py style). ``decide`` is pure, so nothing here is patched."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from kafka_asg.agent.decide import (
    AttachVolumes,
    ClaimEni,
    ConfigureNic,
    Fence,
    Halt,
    InitVolume,
    Install,
    MakeFilesystem,
    Mount,
    NoAction,
    ProtectFromScaleIn,
    RecordKafkaClusterId,
    Refuse,
    Render,
    StartServer,
    VolumeMount,
    decide,
)
from kafka_asg.agent.ports import DiskState, EniView, InstanceState, NicState, ServerName, ServerState, VolumeView
from kafka_asg.agent.snapshot import Memory, NodeView, VolumeMarker, default_mountpoints, remember
from kafka_asg.config import VOLUME_ROLES, ClusterConfig, VolumeRole, seed_config

CFG: ClusterConfig = seed_config()
ME = "i-0self"
OTHER = "i-0other"
MOUNTS = default_mountpoints()


# ------------------------------------------------------------------------------ factories


def eni(slot: int = 2, attached_to: str | None = None, eni_id: str | None = None) -> EniView:
    ip = {1: "10.0.0.53", 2: "10.0.0.21", 3: "10.0.0.37", 4: "10.0.0.22"}[slot]
    return EniView(
        eni_id=eni_id or f"eni-0slot{slot}",
        slot=slot,
        ip=IPv4Address(ip),
        mac=f"02:00:00:00:01:0{slot}",
        subnet_id="subnet-1b",
        status="in-use" if attached_to else "available",
        attached_to=attached_to,
        attachment_status="attached" if attached_to else None,
    )


def vol(role: VolumeRole, attached_to: str | None = ME, az: str = "eu-west-1b") -> VolumeView:
    return VolumeView(
        volume_id=f"vol-{role}",
        slot=2,
        role=role,
        az=az,
        state="in-use" if attached_to else "available",
        attached_to=attached_to,
        device=None,
    )


def disk(role: VolumeRole, filesystem: str | None = "ext4", mounted: bool = True) -> DiskState:
    return DiskState(
        device=Path(f"/dev/nvme{VOLUME_ROLES.index(role) + 1}n1"),
        filesystem=filesystem,
        label=None,
        mounted_at=Path(MOUNTS[role]) if mounted else None,
    )


def server(
    name: ServerName, running: bool = True, restarts: int = 0, next_start_at: float | None = None
) -> ServerState:
    return ServerState(name, running, 4242 if running else None, restarts, next_start_at)


def view_free_slot() -> NodeView:
    return NodeView.empty().but(enis=(eni(2),))


def view_claimed() -> NodeView:
    """Slot 2's ENI is attached to me and I am protected; nothing else done yet."""
    return NodeView.empty().but(enis=(eni(2, ME),), memory=Memory(claimed_slot=2, protected=True))


def view_volumes_attached() -> NodeView:
    v = view_claimed()
    return v.but(volumes=tuple(vol(r) for r in VOLUME_ROLES), disks={f"vol-{r}": None for r in VOLUME_ROLES})


def view_nic_ready() -> NodeView:
    nic = NicState("ens6", "02:00:00:00:01:02", True, (IPv4Address("10.0.0.21"),), True)
    return view_volumes_attached().but(nic=nic)


def good_marker(role: VolumeRole, kafka_cluster_id: str | None = None) -> VolumeMarker:
    return VolumeMarker("event-servers", 2, role, kafka_cluster_id)


def view_disks_ready() -> NodeView:
    return view_nic_ready().but(
        disks={f"vol-{r}": disk(r) for r in VOLUME_ROLES},
        markers={r: good_marker(r) for r in VOLUME_ROLES},
    )


def view_prepared() -> NodeView:
    v = view_disks_ready()
    return v.but(memory=replace(v.memory, installed=frozenset({"zookeeper", "kafka"}), rendered=True))


def view_zk_serving(mode: str = "follower") -> NodeView:
    v = view_prepared()
    return v.but(servers={"zookeeper": server("zookeeper"), "kafka": server("kafka", running=False)}, zk_mode=mode)


def view_serving() -> NodeView:
    v = view_zk_serving()
    return v.but(
        servers={"zookeeper": server("zookeeper"), "kafka": server("kafka")},
        broker_registered=True,
        zk_myid="2",
        kafka_meta={"broker.id": "2", "cluster.id": "abcDEF"},
        markers={**v.markers, "kafka-log": good_marker("kafka-log", "abcDEF")},
    )


def sentence(view: NodeView) -> str:
    return decide(view, CFG).sentence


# ------------------------------------------------------------------------------ warm pool, claim


def test_warm_pool_stops_before_claiming() -> None:
    d = decide(view_free_slot().but(lifecycle_state="Warmed:Stopped"), CFG)
    assert d.action == Halt()
    assert d.sentence == "warm pool (Warmed:Stopped): not claiming a slot; stopping the agent"


def test_free_slot_is_claimed() -> None:
    d = decide(view_free_slot(), CFG)
    assert d.action == ClaimEni("eni-0slot2", 2, IPv4Address("10.0.0.21"))
    assert d.sentence == "claiming eni-0slot2 (slot 2, 10.0.0.21): the lowest free slot of subnet-1b"
    assert d.state == "booting"


def test_lowest_free_slot_first() -> None:
    d = decide(NodeView.empty().but(enis=(eni(4), eni(2))), CFG)
    assert isinstance(d.action, ClaimEni)
    assert d.action.slot == 2


def test_no_slot_eni_in_subnet() -> None:
    assert sentence(NodeView.empty()) == (
        "waiting: no slot ENI tagged Name=event-servers-eni, event-servers in subnet-1b "
        "(run `kafka-asg up`, or check the ASG's subnets)"
    )


def with_holder(state: InstanceState | None, now: float = 1000.0, since: float | None = None) -> NodeView:
    v = NodeView.empty(now=now).but(enis=(eni(2, OTHER),), holders={OTHER: state})
    if since is not None:
        v = v.but(memory=Memory(waiting_since={"eni-0slot2": since}))
    return v


def test_race_lost_then_holder_alive_means_standby() -> None:
    # The cycle after losing the InUse race: EC2 shows the ENI attached to the winner, which is running.
    d = decide(with_holder("running"), CFG)
    assert d.action == NoAction()
    assert d.state == "standby"
    assert d.sentence == ("standing by: every slot of subnet-1b is held by a live instance (slot 2: i-0other)")
    assert d.recheck == "idle"  # a live holder: the standby heartbeat, few API calls for days


@pytest.mark.parametrize("state", ["shutting-down", "terminated", "stopping", "stopped"])
def test_holder_dying_means_wait(state: InstanceState) -> None:
    d = decide(with_holder(state, now=1012.0, since=1000.0), CFG)
    assert d.action == NoAction()
    assert d.sentence == (
        f"waiting for eni-0slot2 (slot 2, 10.0.0.21): holder i-0other is {state} (waited 12s of 300s)"
    )
    # Another instance's shutdown: the boot pace (not the standby heartbeat: the slot frees any second now).
    assert d.recheck == "boot"


def test_holder_gone_from_ec2_means_wait() -> None:
    assert sentence(with_holder(None)) == (
        "waiting for eni-0slot2 (slot 2, 10.0.0.21): holder i-0other is gone from EC2 (waited 0s of 300s)"
    )


def test_wait_deadline_passed_means_standby() -> None:
    d = decide(with_holder("shutting-down", now=1300.0, since=1000.0), CFG)
    assert d.state == "standby"
    assert d.sentence == (
        "standing by: gave up waiting for eni-0slot2 (slot 2) after 300s; holder i-0other is still "
        "shutting-down; re-checking each cycle"
    )


def test_remember_starts_the_wait_clock_once() -> None:
    v = with_holder("shutting-down", now=1000.0)
    first = remember(v)
    assert first.waiting_since == {"eni-0slot2": 1000.0}
    later = remember(v.but(now=1100.0, memory=first))
    assert later.waiting_since == {"eni-0slot2": 1000.0}
    freed = remember(v.but(enis=(eni(2),), holders={}, memory=later))
    assert freed.waiting_since == {}


def test_standby_takes_a_slot_once_one_frees() -> None:
    standby = NodeView.empty().but(enis=(eni(2, OTHER),), holders={OTHER: "running"})
    assert decide(standby, CFG).state == "standby"
    freed = standby.but(enis=(eni(2),), holders={})
    assert isinstance(decide(freed, CFG).action, ClaimEni)


def test_surplus_never_starts_a_server() -> None:
    standby = NodeView.empty().but(enis=(eni(2, OTHER),), holders={OTHER: "running"})
    assert not isinstance(decide(standby, CFG).action, StartServer)


# ------------------------------------------------------------------------------ fence


def test_fence_lost_stops_servers_at_once() -> None:
    v = view_serving().but(enis=(eni(2, OTHER),), holders={OTHER: "running"})
    d = decide(v, CFG)
    assert isinstance(d.action, Fence)
    assert d.state == "stopping"
    assert d.sentence == (
        "fenced: eni-0slot2 (slot 2) is no longer attached to this instance (holder: i-0other); "
        "stopping kafka and zookeeper"
    )


def test_servers_running_without_any_slot_are_fenced() -> None:
    v = NodeView.empty().but(servers={"zookeeper": server("zookeeper"), "kafka": server("kafka", running=False)})
    assert sentence(v) == "fenced: this instance holds no slot ENI; stopping kafka and zookeeper"


def test_volume_taken_by_another_instance_is_a_lost_fence() -> None:
    v = view_serving()
    v = v.but(volumes=(vol("zk-data", OTHER), vol("zk-txlog"), vol("kafka-log")))
    assert sentence(v) == ("fenced: vol-zk-data (slot 2 zk-data) is attached to i-0other; stopping kafka and zookeeper")


# ------------------------------------------------------------------------------ claimed: protect, volumes


def test_claimed_slot_is_protected_from_scale_in() -> None:
    v = view_claimed().but(memory=Memory(claimed_slot=2))
    d = decide(v, CFG)
    assert d.action == ProtectFromScaleIn(2)
    assert d.sentence == "protecting i-0self from scale-in: it holds slot 2 (eni-0slot2)"


def test_free_volumes_are_attached_in_role_order() -> None:
    v = view_claimed().but(volumes=tuple(vol(r, attached_to=None) for r in reversed(VOLUME_ROLES)))
    d = decide(v, CFG)
    assert d.action == AttachVolumes(
        (("vol-zk-data", "/dev/sdf"), ("vol-zk-txlog", "/dev/sdg"), ("vol-kafka-log", "/dev/sdh"))
    )
    assert d.sentence == (
        "attaching slot 2 volumes: vol-zk-data (zk-data), vol-zk-txlog (zk-txlog), vol-kafka-log (kafka-log)"
    )


def test_free_volumes_are_attached_with_the_protection_a_held_one_waits_after_it() -> None:
    unprotected = Memory(claimed_slot=2)
    free = view_claimed().but(volumes=tuple(vol(r, attached_to=None) for r in VOLUME_ROLES), memory=unprotected)
    d = decide(free, CFG)
    # One step, the calls side by side: EC2 plugs the volumes while the protection runs.
    assert d.action == AttachVolumes(
        (("vol-zk-data", "/dev/sdf"), ("vol-zk-txlog", "/dev/sdg"), ("vol-kafka-log", "/dev/sdh")), protect=True
    )
    assert d.sentence == (
        "attaching slot 2 volumes: vol-zk-data (zk-data), vol-zk-txlog (zk-txlog), vol-kafka-log (kafka-log); "
        "protecting i-0self from scale-in: it holds slot 2 (eni-0slot2)"
    )
    held = free.but(volumes=(vol("zk-data"), vol("zk-txlog", attached_to="i-0other"), vol("kafka-log")))
    assert decide(held, CFG).action == ProtectFromScaleIn(2)  # a slot holder waits protected
    assert decide(held.but(memory=Memory(claimed_slot=2, protected=True)), CFG).sentence.startswith(
        "waiting: vol-zk-txlog (slot 2 zk-txlog) is attached to i-0other"
    )


def test_missing_volume_means_wait_never_start() -> None:
    v = view_claimed().but(volumes=(vol("zk-data"), vol("kafka-log")))
    d = decide(v, CFG)
    assert d.action == NoAction()
    assert d.sentence == (
        "waiting: slot 2 has no zk-txlog volume tagged for event-servers (run `kafka-asg up`); "
        "not starting without all three"
    )


def test_volume_held_by_another_instance_means_wait() -> None:
    v = view_claimed().but(
        volumes=(vol("zk-data"), vol("zk-txlog", OTHER), vol("kafka-log", None)), holders={OTHER: "shutting-down"}
    )
    assert sentence(v) == (
        "waiting: vol-zk-txlog (slot 2 zk-txlog) is attached to i-0other (shutting-down); "
        "not starting without all three volumes"
    )


def test_volume_in_another_az_is_refused() -> None:
    v = view_claimed().but(volumes=(vol("zk-data"), vol("zk-txlog"), vol("kafka-log", None, az="eu-west-1c")))
    d = decide(v, CFG)
    assert isinstance(d.action, Refuse)
    assert d.state == "refused"


# ------------------------------------------------------------------------------ NIC


def test_nic_not_visible_yet_means_wait() -> None:
    assert sentence(view_volumes_attached()) == (
        "waiting: the NIC of eni-0slot2 (MAC 02:00:00:00:01:02) is not visible to the OS yet"
    )


def test_nic_without_policy_routing_is_configured() -> None:
    nic = NicState("ens6", "02:00:00:00:01:02", False, (), False)
    d = decide(view_volumes_attached().but(nic=nic), CFG)
    assert isinstance(d.action, ConfigureNic)
    assert d.action.table == 10001
    assert d.sentence == "configuring ens6 (eni-0slot2): 10.0.0.21/28, policy routing via table 10001"


def test_nic_with_address_but_no_rule_is_configured() -> None:
    nic = NicState("ens6", "02:00:00:00:01:02", True, (IPv4Address("10.0.0.21"),), False)
    assert isinstance(decide(view_volumes_attached().but(nic=nic), CFG).action, ConfigureNic)


# ------------------------------------------------------------------------------ disks


def test_disk_not_visible_yet_means_wait() -> None:
    assert sentence(view_nic_ready()) == (
        "waiting: volume vol-zk-data (zk-data) is not visible under /dev/disk/by-id yet"
    )


def test_mkfs_only_when_the_device_has_no_filesystem() -> None:
    v = view_nic_ready().but(disks={f"vol-{r}": disk(r, filesystem=None, mounted=False) for r in VOLUME_ROLES})
    d = decide(v, CFG)
    assert d.action == MakeFilesystem("vol-zk-data", Path("/dev/nvme1n1"), "zk-data2")
    assert d.sentence == "making a filesystem on /dev/nvme1n1 (vol-zk-data, zk-data): it has none"


@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_never_mkfs_on_a_device_with_a_filesystem(fs: str) -> None:
    v = view_nic_ready().but(disks={f"vol-{r}": disk(r, filesystem=fs, mounted=False) for r in VOLUME_ROLES})
    d = decide(v, CFG)
    assert not isinstance(d.action, MakeFilesystem)
    assert d.action == Mount(
        (
            VolumeMount("vol-zk-data", Path("/dev/nvme1n1"), Path("/var/lib/zookeeper/data"), fs),
            VolumeMount("vol-zk-txlog", Path("/dev/nvme2n1"), Path("/var/lib/zookeeper/transaction-log"), fs),
            VolumeMount("vol-kafka-log", Path("/dev/nvme3n1"), Path("/var/lib/kafka/event-log"), fs),
        )
    )
    assert d.sentence == (
        f"mounting /dev/nvme1n1 (vol-zk-data, zk-data, {fs}) at /var/lib/zookeeper/data; "
        f"/dev/nvme2n1 (vol-zk-txlog, zk-txlog, {fs}) at /var/lib/zookeeper/transaction-log; "
        f"/dev/nvme3n1 (vol-kafka-log, kafka-log, {fs}) at /var/lib/kafka/event-log"
    )


def test_a_partitioned_device_is_refused_never_formatted_nor_mounted() -> None:
    disks = {f"vol-{r}": disk(r, filesystem="ext4", mounted=False) for r in VOLUME_ROLES}
    disks["vol-zk-txlog"] = disk("zk-txlog", filesystem="partition table gpt", mounted=False)
    d = decide(view_nic_ready().but(disks=disks), CFG)
    assert isinstance(d.action, Refuse) and d.state == "refused"
    assert d.sentence == (
        "refused: volume vol-zk-txlog (zk-txlog) at /dev/nvme2n1 holds a partition table gpt, not a filesystem: "
        "kafka-asg mounts a whole device and never formats one that holds anything"
    )


def test_every_filesystem_is_made_before_the_volumes_are_mounted_together() -> None:
    disks = {f"vol-{r}": disk(r, filesystem="ext4", mounted=False) for r in VOLUME_ROLES}
    v = view_nic_ready().but(disks={**disks, "vol-zk-txlog": disk("zk-txlog", filesystem=None, mounted=False)})
    assert decide(v, CFG).action == MakeFilesystem("vol-zk-txlog", Path("/dev/nvme2n1"), "zk-txlog2")


def test_only_the_volumes_not_yet_mounted_are_mounted() -> None:
    v = view_nic_ready().but(
        disks={
            **{f"vol-{r}": disk(r) for r in VOLUME_ROLES},
            "vol-kafka-log": disk("kafka-log", filesystem="ext4", mounted=False),
        }
    )
    d = decide(v, CFG)
    mount = VolumeMount("vol-kafka-log", Path("/dev/nvme3n1"), Path("/var/lib/kafka/event-log"), "ext4")
    assert d.action == Mount((mount,))
    assert d.sentence == "mounting /dev/nvme3n1 (vol-kafka-log, kafka-log, ext4) at /var/lib/kafka/event-log"


def test_fresh_volume_gets_its_marker() -> None:
    v = view_disks_ready()
    v = v.but(markers={**v.markers, "kafka-log": None})
    d = decide(v, CFG)
    assert d.action == InitVolume(
        "kafka-log", Path("/var/lib/kafka/event-log"), VolumeMarker("event-servers", 2, "kafka-log")
    )
    assert d.sentence == "marking vol-kafka-log as event-servers slot 2 kafka-log"


# ------------------------------------------------------------------------------ identity


def refused(v: NodeView) -> str:
    d = decide(v, CFG)
    assert isinstance(d.action, Refuse)
    assert d.state == "refused"
    return d.sentence


def test_marker_of_another_cluster_is_refused() -> None:
    v = view_disks_ready()
    v = v.but(markers={**v.markers, "zk-data": VolumeMarker("other-cluster", 2, "zk-data")})
    assert refused(v) == (
        "refused: vol-zk-data (zk-data) belongs to cluster other-cluster slot 2 zk-data, not event-servers "
        "slot 2 zk-data; not starting zookeeper or kafka"
    )


def test_marker_of_another_slot_is_refused() -> None:
    v = view_disks_ready()
    v = v.but(markers={**v.markers, "zk-txlog": VolumeMarker("event-servers", 3, "zk-txlog")})
    assert "belongs to cluster event-servers slot 3 zk-txlog" in refused(v)


def test_wrong_myid_is_refused() -> None:
    assert refused(view_disks_ready().but(zk_myid="3")) == (
        "refused: zookeeper myid on the zk-data volume is '3', not 2; not starting zookeeper or kafka"
    )


def test_wrong_broker_id_is_refused() -> None:
    v = view_disks_ready().but(kafka_meta={"broker.id": "1", "cluster.id": "x"})
    assert refused(v) == (
        "refused: kafka meta.properties on the kafka-log volume has broker.id=1, not 2; not starting zookeeper or kafka"
    )


def test_foreign_kafka_data_without_marker_is_refused() -> None:
    v = view_disks_ready()
    v = v.but(markers={**v.markers, "kafka-log": None}, kafka_meta={"broker.id": "2", "cluster.id": "OtherCl"})
    assert refused(v) == (
        "refused: vol-kafka-log (kafka-log) has no kafka-asg marker but holds kafka data (meta.properties "
        "broker.id=2 cluster.id=OtherCl); not starting zookeeper or kafka"
    )


def test_kafka_cluster_id_other_than_recorded_is_refused() -> None:
    v = view_disks_ready()
    v = v.but(
        markers={**v.markers, "kafka-log": good_marker("kafka-log", "Recorded")},
        kafka_meta={"broker.id": "2", "cluster.id": "Another"},
    )
    assert "cluster.id=Another, but this volume was formatted for kafka cluster Recorded" in refused(v)


def test_unreadable_marker_is_refused() -> None:
    v = view_disks_ready()
    v = v.but(markers={**v.markers, "zk-data": VolumeMarker.parse("{not json")})
    assert "vol-zk-data (zk-data): unreadable marker" in refused(v)


def test_matching_identity_passes() -> None:
    v = view_disks_ready().but(zk_myid="2", kafka_meta={"broker.id": "2", "cluster.id": "x"})
    assert isinstance(decide(v, CFG).action, Install)


# ------------------------------------------------------------------------------ install, render, servers


def test_install_zookeeper_then_render() -> None:
    d = decide(view_disks_ready(), CFG)
    assert (d.action, d.sentence) == (Install("zookeeper"), "installing zookeeper 3.8.7")
    v = view_disks_ready()
    v = v.but(memory=replace(v.memory, installed=frozenset({"zookeeper"})))
    d = decide(v, CFG)
    assert d.action == Render(2)
    assert d.sentence == "rendering zoo.cfg, myid and server.properties for slot 2"


def test_kafka_is_installed_once_zookeeper_started_before_the_quorum_wait() -> None:
    v = view_prepared()
    only_zk = v.but(memory=replace(v.memory, installed=frozenset({"zookeeper"})))
    assert decide(only_zk, CFG).action == StartServer("zookeeper", restart=False)
    zk = view_zk_serving()
    # Installed while ZooKeeper joins the quorum: the quorum's arrival then starts Kafka in the next cycle.
    joining = zk.but(zk_mode="not serving", memory=replace(zk.memory, installed=frozenset({"zookeeper"})))
    d = decide(joining, CFG)
    assert (d.action, d.sentence) == (Install("kafka"), "installing kafka 3.9.2")
    installed = joining.but(memory=replace(joining.memory, installed=frozenset({"zookeeper", "kafka"})))
    assert sentence(installed) == "waiting: zookeeper quorum not formed (mode: not serving)"


def test_zookeeper_starts_first() -> None:
    d = decide(view_prepared(), CFG)
    assert d.action == StartServer("zookeeper", restart=False)
    assert d.sentence == "starting zookeeper (server.2, 10.0.0.21:2181)"


@pytest.mark.parametrize("mode", ["not serving", "down"])
def test_kafka_waits_for_the_zookeeper_quorum(mode: str) -> None:
    d = decide(view_zk_serving(mode), CFG)
    assert d.action == NoAction()
    assert d.sentence == f"waiting: zookeeper quorum not formed (mode: {mode})"
    assert d.recheck == "soon"  # this node's own server: re-checked sooner than a wait on EC2


@pytest.mark.parametrize("mode", ["leader", "follower"])
def test_kafka_starts_once_zookeeper_serves(mode: str) -> None:
    d = decide(view_zk_serving(mode), CFG)
    assert d.action == StartServer("kafka", restart=False)
    assert d.sentence == "starting kafka (broker 2, 10.0.0.21:9095)"


def test_broker_not_registered_yet() -> None:
    v = view_zk_serving().but(servers={"zookeeper": server("zookeeper"), "kafka": server("kafka")})
    assert sentence(v) == "waiting: broker 2 not registered in zookeeper yet (zookeeper follower)"
    assert decide(v, CFG).recheck == "watched"  # the registration wakes the loop


def test_kafka_waits_while_a_predecessors_registration_lingers() -> None:
    # A second broker 2 would fail with NodeExists (or, if the old one still lives, be its twin).
    d = decide(view_zk_serving().but(leftover_registration=True), CFG)
    assert d.action == NoAction()
    assert d.sentence == (
        "waiting: /brokers/ids/2 still holds a previous broker 2's registration (its zookeeper session has not "
        "expired); starting kafka once it is gone"
    )
    assert d.recheck == "watched"  # another instance's session: its end wakes the loop (a ZooKeeper watch)


def test_running_kafka_with_a_lingering_registration_is_not_registered() -> None:
    v = view_zk_serving().but(
        servers={"zookeeper": server("zookeeper"), "kafka": server("kafka")}, leftover_registration=True
    )
    assert sentence(v) == "waiting: broker 2 not registered in zookeeper yet (zookeeper follower)"


def test_serving_is_no_action() -> None:
    d = decide(view_serving(), CFG)
    assert d.action == NoAction()
    assert d.state == "serving"
    assert d.sentence == "no action: zookeeper follower, broker 2 registered"


def test_kafka_cluster_id_is_recorded_once_serving() -> None:
    v = view_serving()
    v = v.but(markers={**v.markers, "kafka-log": good_marker("kafka-log")})
    d = decide(v, CFG)
    assert d.action == RecordKafkaClusterId(
        Path("/var/lib/kafka/event-log"), VolumeMarker("event-servers", 2, "kafka-log", "abcDEF")
    )


def test_crashed_server_waits_for_its_backoff() -> None:
    v = view_serving().but(
        now=1000.0, servers={"zookeeper": server("zookeeper"), "kafka": server("kafka", False, 2, 1004.0)}
    )
    d = decide(v, CFG)
    assert d.action == NoAction()
    assert d.sentence == "waiting: kafka exited (2x); restarting in 4s (backoff)"


def test_crashed_server_restarts_after_its_backoff() -> None:
    v = view_serving().but(
        now=1005.0, servers={"zookeeper": server("zookeeper", False, 1, 1002.0), "kafka": server("kafka")}
    )
    d = decide(v, CFG)
    assert d.action == StartServer("zookeeper", restart=True)
    assert d.sentence == "restarting zookeeper (server.2, 10.0.0.21:2181; it exited 1x)"


def test_decide_is_pure() -> None:
    v = view_serving()
    assert decide(v, CFG) == decide(v, CFG)


# ------------------------------------------------------------------------------ per-instance volume mode

PER_INSTANCE = replace(CFG, volumes="per-instance")


def test_per_instance_mode_attaches_nothing_and_prepares_the_launch_template_volumes() -> None:
    v = view_nic_ready().but(disks={f"vol-{r}": disk(r, filesystem=None, mounted=False) for r in VOLUME_ROLES})
    d = decide(v, PER_INSTANCE)
    assert d.action == MakeFilesystem("vol-zk-data", Path("/dev/nvme1n1"), "zk-data2")


def test_per_instance_mode_without_the_mapped_volumes_waits() -> None:
    v = view_claimed().but(volumes=(vol("zk-data"),))
    assert decide(v, PER_INSTANCE).sentence == (
        "waiting: this instance has no EBS volume at /dev/sdc (zk-txlog), /dev/sdd (kafka-log): the launch "
        "template must map all three (re-run `kafka-asg up`)"
    )
