"""The agent's one immutable picture of the world, built at the top of every cycle (Patroni's ``Cluster``).

:func:`observe` reads everything the decision needs through the interfaces in :mod:`kafka_asg.agent.ports`;
:func:`kafka_asg.agent.decide.decide` then only *reads* the resulting :class:`NodeView`. What the agent
itself remembers between cycles of one process (when it started waiting for a slot, whether it has
installed and rendered in this process) travels in :class:`Memory`, so it is part of the snapshot too.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path, PurePosixPath

from kafka_asg.agent.ports import (
    SERVING_ZK_MODES,
    Cloud,
    DiskState,
    EniView,
    Host,
    Imds,
    InstanceIdentity,
    InstanceState,
    NicState,
    ServerName,
    ServerState,
    Services,
    VolumeView,
    ZkMode,
)
from kafka_asg.config import PER_INSTANCE_DEVICES, VOLUME_ROLES, ClusterConfig, VolumeRole
from kafka_asg.fsutil import read_properties

logger = logging.getLogger(__name__)

# The file the agent writes at the root of every slot volume right after making its filesystem.
MARKER_NAME = "kafka-asg-volume.json"
START_TIME_SLACK = 1.0  # seconds; see classify_registration
SERVER_NAMES: tuple[ServerName, ...] = ("zookeeper", "kafka")
# A holder in one of these states is on its way out: EC2 releases its ENI and volumes once it is
# terminated (https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/scenarios-enis.html), so waiting is right.
DYING_STATES: frozenset[str] = frozenset({"shutting-down", "terminated", "stopping", "stopped"})


@dataclass(frozen=True)
class VolumeMarker:
    """What ``kafka-asg-volume.json`` on a volume says it belongs to; ``error`` when it cannot be read."""

    cluster: str
    slot: int
    role: str
    kafka_cluster_id: str | None = None
    error: str | None = None

    def to_json(self) -> str:
        doc: dict[str, object] = {"version": 1, "cluster": self.cluster, "slot": self.slot, "role": self.role}
        if self.kafka_cluster_id:
            doc["kafka_cluster_id"] = self.kafka_cluster_id
        return json.dumps(doc, sort_keys=True) + "\n"

    @classmethod
    def parse(cls, text: str) -> VolumeMarker:
        try:
            doc = json.loads(text)
            return cls(
                cluster=str(doc["cluster"]),
                slot=int(doc["slot"]),
                role=str(doc["role"]),
                kafka_cluster_id=doc.get("kafka_cluster_id"),
            )
        except (ValueError, KeyError, TypeError) as exc:
            return cls(cluster="", slot=0, role="", error=f"unreadable marker ({exc})")


@dataclass(frozen=True)
class Memory:
    """What this agent process remembers between cycles (the only state not re-observed each cycle).

    :param claimed_slot: the slot this process claimed; seeing its ENI attached elsewhere is a lost fence.
    :param waiting_since: per ENI id, the monotonic time this process first saw it held by a dying holder.
    :param protected: scale-in protection is set for this instance (per-instance semaphore).
    :param installed: the servers whose archive this process fetched, verified and unpacked (ZooKeeper's
        first: it starts while Kafka's, seven times larger, is still unpacking).
    :param rendered: configs rendered and written by this process.
    """

    claimed_slot: int | None = None
    waiting_since: Mapping[str, float] = field(default_factory=dict)
    protected: bool = False
    installed: frozenset[ServerName] = frozenset()
    rendered: bool = False


@dataclass(frozen=True)
class NodeView:
    """Everything observed at the top of one cycle. Read-only; ``decide`` needs nothing else."""

    now: float  # monotonic seconds, comparable with ServerState.next_start_at
    identity: InstanceIdentity
    lifecycle_state: str | None
    enis: tuple[EniView, ...]  # the cluster's slot ENIs in my subnet
    holders: Mapping[str, InstanceState | None]  # instance id -> state, for every other holder seen
    volumes: tuple[VolumeView, ...]  # the volumes of my slot (empty while no slot is mine)
    nic: NicState | None  # the NIC with my slot ENI's MAC, once the OS shows it
    disks: Mapping[str, DiskState | None]  # volume id -> block device as the OS shows it
    mountpoints: Mapping[VolumeRole, PurePosixPath]  # role -> where the base configs put that data
    markers: Mapping[VolumeRole, VolumeMarker | None]  # read only from volumes mounted where they belong
    zk_myid: str | None  # ZooKeeper's myid on the zk-data volume
    kafka_meta: Mapping[str, str] | None  # meta.properties on the kafka-log volume
    servers: Mapping[ServerName, ServerState]
    zk_mode: ZkMode
    broker_registered: bool  # by the Kafka process running now (see classify_registration)
    memory: Memory = field(default_factory=Memory)
    # /brokers/ids/<slot> exists but is not the running Kafka's: a dead predecessor's, until its session expires.
    leftover_registration: bool = False

    # ---------------------------------------------------------------------------- factories
    @classmethod
    def empty(cls, identity: InstanceIdentity | None = None, now: float = 1000.0) -> NodeView:
        """A view of a fresh instance that has observed nothing yet (the tests' starting point)."""
        return cls(
            now=now,
            identity=identity or default_identity(),
            lifecycle_state="InService",
            enis=(),
            holders={},
            volumes=(),
            nic=None,
            disks={},
            mountpoints=default_mountpoints(),
            markers={},
            zk_myid=None,
            kafka_meta=None,
            servers={name: ServerState(name, False, None, 0, None) for name in SERVER_NAMES},
            zk_mode="down",
            broker_registered=False,
        )

    def but(self, **changes: object) -> NodeView:
        """A copy with some facts changed (``dataclasses.replace``), for builders and tests."""
        return replace(self, **changes)  # type: ignore[arg-type]

    # --------------------------------------------------------------------------- predicates
    @property
    def instance_id(self) -> str:
        return self.identity.instance_id

    @property
    def my_eni(self) -> EniView | None:
        """The slot ENI of my subnet attached to me (read back from EC2: the fence)."""
        mine = [e for e in self.enis if e.attached_to == self.instance_id]
        return min(mine, key=lambda e: e.slot) if mine else None

    @property
    def free_enis(self) -> tuple[EniView, ...]:
        """Unattached slot ENIs, lowest slot first."""
        free = [e for e in self.enis if e.attached_to is None and e.status == "available"]
        return tuple(sorted(free, key=lambda e: e.slot))

    def holder_state(self, eni: EniView) -> InstanceState | None:
        return self.holders.get(eni.attached_to or "")

    def is_holder_alive(self, eni: EniView) -> bool:
        return eni.attached_to is not None and self.holder_state(eni) in ("pending", "running")

    @property
    def is_warm_pool(self) -> bool:
        return (self.lifecycle_state or "").startswith("Warmed:")

    def server(self, name: ServerName) -> ServerState:
        return self.servers[name]

    @property
    def has_running_server(self) -> bool:
        return any(s.running for s in self.servers.values())

    def volume(self, role: VolumeRole) -> VolumeView | None:
        return next((v for v in self.volumes if v.role == role), None)


# ------------------------------------------------------------------------------- defaults


def default_identity() -> InstanceIdentity:
    """The seed's slot 2 subnet (eu-west-1b, 10.0.0.16/28); only for tests and examples."""
    return InstanceIdentity(
        instance_id="i-0self",
        region="eu-west-1",
        az="eu-west-1b",
        az_id="euw1-az2",
        mac="02:00:00:00:00:01",
        subnet_id="subnet-1b",
        subnet_cidr=IPv4Network("10.0.0.16/28"),
        vpc_id="vpc-1",
        local_ipv4=IPv4Address("10.0.0.25"),
    )


def default_mountpoints() -> dict[VolumeRole, PurePosixPath]:
    """The seed's base configs: ZooKeeper dataDir, dataLogDir and Kafka log.dir."""
    return {
        "zk-data": PurePosixPath("/var/lib/zookeeper/data"),
        "zk-txlog": PurePosixPath("/var/lib/zookeeper/transaction-log"),
        "kafka-log": PurePosixPath("/var/lib/kafka/event-log"),
    }


# -------------------------------------------------------------------------------- observe


def observe(
    *,
    cfg: ClusterConfig,
    identity: InstanceIdentity,
    imds: Imds,
    cloud: Cloud,
    host: Host,
    services: Services,
    mountpoints: Mapping[VolumeRole, PurePosixPath],
    memory: Memory,
    now: float,
) -> NodeView:
    """Build the cycle's :class:`NodeView`. Raises ``Unavailable`` when a source cannot be read; the
    cycle then decides nothing (acting on a partial picture could start a second broker with one id)."""
    lifecycle = imds.target_lifecycle_state()
    enis = tuple(cloud.slot_enis(cfg.name, identity.subnet_id))
    holder_ids = {e.attached_to for e in enis if e.attached_to and e.attached_to != identity.instance_id}
    mine = [e for e in enis if e.attached_to == identity.instance_id]
    my_eni = min(mine, key=lambda e: e.slot) if mine else None
    volumes: tuple[VolumeView, ...] = ()
    nic = None
    disks: dict[str, DiskState | None] = {}
    if my_eni is not None:
        nic = host.nic_by_mac(my_eni.mac)
        if cfg.volumes == "per-slot":
            volumes = tuple(sorted(cloud.slot_volumes(cfg.name, my_eni.slot), key=lambda v: v.role))
            holder_ids |= {v.attached_to for v in volumes if v.attached_to and v.attached_to != identity.instance_id}
        else:
            volumes = _instance_volumes(cloud.instance_volumes(identity.instance_id), identity, my_eni.slot)
        disks = host.disks([v.volume_id for v in volumes if v.attached_to == identity.instance_id])
    holders = {h: cloud.instance_state(h) for h in sorted(holder_ids)}

    markers, zk_myid, kafka_meta = _identity_files(host, volumes, disks, mountpoints, identity.instance_id)
    servers = {name: services.state(name) for name in SERVER_NAMES}
    zk_mode: ZkMode = "down"
    registered = leftover = False
    if my_eni is not None and servers["zookeeper"].running:
        zk_mode = services.zk_mode(my_eni.ip, cfg.ports.zk_client)
    if my_eni is not None and zk_mode in SERVING_ZK_MODES:
        # Ask this node's own server, which was just seen serving: a connect string with every slot would let
        # the client pick a slot whose IP nobody holds yet and time out.
        registration = services.broker_registration(f"{my_eni.ip}:{cfg.ports.zk_client}", my_eni.slot)
        registered, leftover = classify_registration(registration, servers["kafka"])
    return NodeView(
        now=now,
        identity=identity,
        lifecycle_state=lifecycle,
        enis=enis,
        holders=holders,
        volumes=volumes,
        nic=nic,
        disks=disks,
        mountpoints=dict(mountpoints),
        markers=markers,
        zk_myid=zk_myid,
        kafka_meta=kafka_meta,
        servers=servers,
        zk_mode=zk_mode,
        broker_registered=registered,
        memory=memory,
        leftover_registration=leftover,
    )


def classify_registration(registered_at: float | None, kafka: ServerState) -> tuple[bool, bool]:
    """(registered by the running Kafka, held by someone else) for a /brokers/ids node registered at
    ``registered_at`` (wall clock; None: no node).

    The node is ephemeral, but it outlives a broker that died without closing its session by the session
    timeout (zookeeper.session.timeout.ms, 18 s by default): a replacement's broker must not be taken as
    registered on its predecessor's node; its own registration fails with NodeExists until that session
    expires. A node is the running Kafka's if written after that process started, less a second of slack
    for a start time read from /proc (whole-second boot time).
    """
    if registered_at is None:
        return False, False
    ours = kafka.running and registered_at >= (kafka.started_at or 0.0) - START_TIME_SLACK
    return ours, not ours


def _instance_volumes(mappings: Mapping[str, str], identity: InstanceIdentity, slot: int) -> tuple[VolumeView, ...]:
    """Per-instance mode: the launch template's volumes, by the seed's device names, seen as this slot's."""
    return tuple(
        VolumeView(mappings[device], slot, role, identity.az, "in-use", identity.instance_id, device)
        for role, device in PER_INSTANCE_DEVICES.items()
        if device in mappings
    )


def _identity_files(
    host: Host,
    volumes: tuple[VolumeView, ...],
    disks: Mapping[str, DiskState | None],
    mountpoints: Mapping[VolumeRole, PurePosixPath],
    instance_id: str,
) -> tuple[dict[VolumeRole, VolumeMarker | None], str | None, dict[str, str] | None]:
    """Read marker, myid and meta.properties, but only from volumes mounted where they belong: reading the
    directory of an unmounted volume would read the root disk and judge the wrong data."""
    mounted: set[VolumeRole] = set()
    for role in VOLUME_ROLES:
        vol = next((v for v in volumes if v.role == role and v.attached_to == instance_id), None)
        disk = disks.get(vol.volume_id) if vol else None
        if disk is not None and disk.mounted_at is not None and str(disk.mounted_at) == str(mountpoints[role]):
            mounted.add(role)
    markers: dict[VolumeRole, VolumeMarker | None] = {}
    for role in sorted(mounted):
        text = host.read_file(Path(mountpoints[role]) / MARKER_NAME)
        markers[role] = VolumeMarker.parse(text) if text is not None else None
    zk_myid = None
    if "zk-data" in mounted:
        text = host.read_file(Path(mountpoints["zk-data"]) / "myid")
        zk_myid = text.strip() if text is not None else None
    kafka_meta = None
    if "kafka-log" in mounted:
        text = host.read_file(Path(mountpoints["kafka-log"]) / "meta.properties")
        kafka_meta = read_properties(text) if text is not None else None
    return markers, zk_myid, kafka_meta


def remember(view: NodeView) -> Memory:
    """The memory to decide with, updated from this view.

    - ``waiting_since``: start the clock for an ENI the first time it is seen held by a dying holder;
      forget ENIs no longer held by one.
    - ``claimed_slot``: adopt the slot EC2 shows attached to us (an agent restarted on a live instance).
    - ``rendered``: forget it while no slot is ours, so a later claim renders for the slot it gets.
    """
    dying = {
        e.eni_id
        for e in view.enis
        if e.attached_to and e.attached_to != view.instance_id and not view.is_holder_alive(e)
    }
    waits = {eni: t for eni, t in view.memory.waiting_since.items() if eni in dying}
    for eni in sorted(dying - waits.keys()):
        waits[eni] = view.now
    memory = replace(view.memory, waiting_since=waits)
    mine = view.my_eni
    if mine is None:
        return replace(memory, rendered=False)
    if memory.claimed_slot != mine.slot:
        return replace(memory, claimed_slot=mine.slot, rendered=False)
    return memory
