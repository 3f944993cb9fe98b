"""The agent's decisions: a PURE function of one :class:`NodeView` (no I/O, no clock, no patching in tests).

``decide`` is a cascade of guard clauses that return early, one function per branch (Patroni's
``Ha._run_cycle`` shape). Every :class:`Decision` carries the action to execute, the sentence that explains
it (logged once per cycle and asserted by the unit tests) and the node state it implies for ``status.json``.
Order of the cascade (issue 4, boot steps 1-8):

warm pool -> fence -> claim / wait / stand by -> scale-in protection -> volumes -> NIC -> disks ->
identity -> install ZooKeeper -> render -> ZooKeeper -> quorum -> install Kafka -> Kafka -> broker registered ->
no action.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Literal

from kafka_asg.agent.ports import PARTITION_TABLE, SERVING_ZK_MODES, EniView, ServerName, VolumeView
from kafka_asg.agent.snapshot import NodeView, VolumeMarker
from kafka_asg.config import PER_INSTANCE_DEVICES, VOLUME_ROLES, ClusterConfig, VolumeRole

NodeState = Literal["serving", "booting", "standby", "refused", "stopping"]

# The agent attaches the slot ENI at device index 1 (the primary is 0). AL2023's amazon-ec2-net-utils puts a
# non-primary NIC's policy routes in table 10000 + device-number, and device-number is the DeviceIndex
# (https://github.com/amazonlinux/amazon-ec2-net-utils lib/lib.sh); we use the index we attached with
# rather than IMDS, which can still report 0 right after a hot attach (amazon-ec2-net-utils issue 90).
ENI_DEVICE_INDEX = 1
ROUTE_TABLE_BASE = 10000
# API device names for the slot volumes: away from /dev/sdb-sdd, which per-instance mode puts in the launch
# template (a device-name collision otherwise); the OS finds them by volume id anyway.
VOLUME_DEVICES: dict[VolumeRole, str] = {"zk-data": "/dev/sdf", "zk-txlog": "/dev/sdg", "kafka-log": "/dev/sdh"}


# ------------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class NoAction:
    """Nothing to do this cycle (waiting, standing by, or serving)."""


@dataclass(frozen=True)
class Halt:
    """Stop the agent: this instance is headed for a warm pool and must not claim a slot."""


@dataclass(frozen=True)
class ClaimEni:
    eni_id: str
    slot: int
    ip: IPv4Address
    device_index: int = ENI_DEVICE_INDEX


@dataclass(frozen=True)
class Fence:
    """We no longer hold the slot: stop both servers at once, Kafka first."""

    reason: str


@dataclass(frozen=True)
class ProtectFromScaleIn:
    slot: int


@dataclass(frozen=True)
class AttachVolumes:
    attachments: tuple[tuple[str, str], ...]  # (volume id, API device name)
    protect: bool = False  # and protect the instance from scale-in, in the same step (ProtectFromScaleIn)


@dataclass(frozen=True)
class ConfigureNic:
    ifname: str
    ip: IPv4Address
    subnet: IPv4Network
    table: int


@dataclass(frozen=True)
class MakeFilesystem:
    volume_id: str
    device: Path
    label: str


@dataclass(frozen=True)
class VolumeMount:
    volume_id: str
    device: Path
    mountpoint: Path
    filesystem: str  # as the probe found it (ext4, or blkid's TYPE): mounted as that type


@dataclass(frozen=True)
class Mount:
    """Mount every slot volume that has a filesystem and is not where it belongs, in one step (each mount is a
    cycle's observation fewer on the way to starting ZooKeeper)."""

    mounts: tuple[VolumeMount, ...]


@dataclass(frozen=True)
class InitVolume:
    """Write the kafka-asg marker on a volume we just formatted (and clear ext4's empty lost+found from the
    Kafka log dir: Kafka refuses to start on a log dir holding any non-partition directory)."""

    role: VolumeRole
    mountpoint: Path
    marker: VolumeMarker


@dataclass(frozen=True)
class Refuse:
    reason: str


@dataclass(frozen=True)
class Install:
    """Fetch the server's archive from S3, check its sha256 (and the base configs') against manifest.json,
    unpack."""

    name: ServerName


@dataclass(frozen=True)
class Render:
    """Render zoo.cfg, myid and server.properties and write them atomically."""

    slot: int


@dataclass(frozen=True)
class StartServer:
    name: ServerName
    restart: bool


@dataclass(frozen=True)
class RecordKafkaClusterId:
    """Remember Kafka's cluster.id in the kafka-log marker, so a foreign meta.properties is refused later."""

    mountpoint: Path
    marker: VolumeMarker


Action = (
    NoAction
    | Halt
    | ClaimEni
    | Fence
    | ProtectFromScaleIn
    | AttachVolumes
    | ConfigureNic
    | MakeFilesystem
    | Mount
    | InitVolume
    | Refuse
    | Install
    | Render
    | StartServer
    | RecordKafkaClusterId
)


# How soon the loop looks again after a wait:
# - "device": a NIC or volume this node attached, showing up in the OS (hot-plug: milliseconds to seconds);
# - "soon": something on this node that takes moments (the own server starting);
# - "boot": EC2 or another instance (the old holder's shutdown): the boot pace, which keeps API calls low;
# - "watched": a change a ZooKeeper watch reports (Services.on_change wakes the loop): polled only as a fallback;
# - "idle": serving, standing by, refused: a slow heartbeat (a surplus instance may stand by for days).
# None: by the state (booting -> "boot", anything else -> "idle").
Pace = Literal["device", "soon", "boot", "watched", "idle"]


@dataclass(frozen=True)
class Decision:
    action: Action
    sentence: str
    state: NodeState
    pace: Pace | None = None

    @property
    def recheck(self) -> Pace:
        if self.pace is not None:
            return self.pace
        return "boot" if self.state == "booting" else "idle"


def _wait(sentence: str, state: NodeState = "booting", *, pace: Pace | None = None) -> Decision:
    return Decision(NoAction(), sentence, state, pace)


# ------------------------------------------------------------------------------- cascade


def decide(view: NodeView, cfg: ClusterConfig) -> Decision:
    """The one decision of this cycle. Pure: same view, same decision."""
    if view.is_warm_pool:
        return Decision(
            Halt(), f"warm pool ({view.lifecycle_state}): not claiming a slot; stopping the agent", "standby"
        )
    eni = view.my_eni
    fence = _check_fence(view, eni)
    if fence is not None:
        return fence
    if eni is None:
        return _claim_slot(view, cfg)
    return _bring_up_slot(view, cfg, eni)


def _check_fence(view: NodeView, eni: EniView | None) -> Decision | None:
    """Servers may run only while EC2 says the slot is ours; otherwise a second server with the same id
    could join the quorum. Stop first, ask questions later."""
    remembered = view.memory.claimed_slot
    if eni is None and (remembered is not None or view.has_running_server):
        lost = next((e for e in view.enis if e.slot == remembered), None)
        if lost is not None:
            holder = lost.attached_to or "nobody"
            reason = f"{lost.eni_id} (slot {lost.slot}) is no longer attached to this instance (holder: {holder})"
        else:
            reason = "this instance holds no slot ENI"
        if view.has_running_server:
            return Decision(Fence(reason), f"fenced: {reason}; stopping kafka and zookeeper", "stopping")
    if eni is not None:
        stolen = [v for v in view.volumes if v.attached_to not in (None, view.instance_id)]
        if stolen and view.has_running_server:
            vol = stolen[0]
            reason = f"{vol.volume_id} (slot {vol.slot} {vol.role}) is attached to {vol.attached_to}"
            return Decision(Fence(reason), f"fenced: {reason}; stopping kafka and zookeeper", "stopping")
    return None


def _claim_slot(view: NodeView, cfg: ClusterConfig) -> Decision:
    subnet = view.identity.subnet_id
    if not view.enis:
        return _wait(
            f"waiting: no slot ENI tagged Name={cfg.eni_name}, {cfg.name} in {subnet} "
            f"(run `kafka-asg up`, or check the ASG's subnets)",
            "standby",
        )
    free = view.free_enis
    if free:
        eni = free[0]
        return Decision(
            ClaimEni(eni.eni_id, eni.slot, eni.ip),
            f"claiming {eni.eni_id} (slot {eni.slot}, {eni.ip}): the lowest free slot of {subnet}",
            "booting",
        )
    dying = sorted((e for e in view.enis if not view.is_holder_alive(e)), key=lambda e: e.slot)
    if dying:
        return _wait_for_dying_holder(view, cfg, dying[0])
    held = ", ".join(f"slot {e.slot}: {e.attached_to}" for e in sorted(view.enis, key=lambda e: e.slot))
    return _wait(f"standing by: every slot of {subnet} is held by a live instance ({held})", "standby")


def _wait_for_dying_holder(view: NodeView, cfg: ClusterConfig, eni: EniView) -> Decision:
    """EC2 keeps the ENI attached through shutting-down (and any terminate hook); wait, bounded."""
    holder = eni.attached_to or "an instance"
    state = view.holder_state(eni) or "gone from EC2"
    since = view.memory.waiting_since.get(eni.eni_id, view.now)
    waited = view.now - since
    if waited >= cfg.claim_wait_seconds:
        return _wait(
            f"standing by: gave up waiting for {eni.eni_id} (slot {eni.slot}) after {cfg.claim_wait_seconds}s; "
            f"holder {holder} is still {state}; re-checking each cycle",
            "standby",
        )
    # Looked at at the boot pace: the slot frees within seconds of EC2 finishing the holder's termination,
    # and every second here is a second of a missing broker.
    return _wait(
        f"waiting for {eni.eni_id} (slot {eni.slot}, {eni.ip}): holder {holder} is {state} "
        f"(waited {waited:.0f}s of {cfg.claim_wait_seconds}s)",
        "standby",
        pace="boot",
    )


def _bring_up_slot(view: NodeView, cfg: ClusterConfig, eni: EniView) -> Decision:
    # Free volumes are attached together with the scale-in protection, one step (the calls run side by side): EC2
    # plugs them meanwhile (an EBS attach takes seconds). Any wait for a volume comes after the protection, as a
    # slot holder's.
    attach = _claim_volumes(view, cfg, eni)
    if attach is not None and isinstance(attach.action, AttachVolumes):
        protect = _protect(view, cfg, eni)
        if protect is None:
            return attach
        return Decision(replace(attach.action, protect=True), f"{attach.sentence}; {protect.sentence}", "booting")
    for step in (_protect, _claim_volumes, _configure_nic, _prepare_disks, _check_identity):
        decision = step(view, cfg, eni)
        if decision is not None:
            return decision
    if "zookeeper" not in view.memory.installed:
        return Decision(Install("zookeeper"), f"installing zookeeper {cfg.zookeeper.version}", "booting")
    if not view.memory.rendered:
        return Decision(
            Render(eni.slot), f"rendering zoo.cfg, myid and server.properties for slot {eni.slot}", "booting"
        )
    return _supervise(view, cfg, eni)


def _protect(view: NodeView, cfg: ClusterConfig, eni: EniView) -> Decision | None:
    # A scale-in must remove a standby instance, never a slot holder.
    if view.memory.protected:
        return None
    return Decision(
        ProtectFromScaleIn(eni.slot),
        f"protecting {view.instance_id} from scale-in: it holds slot {eni.slot} ({eni.eni_id})",
        "booting",
    )


def _claim_volumes(view: NodeView, cfg: ClusterConfig, eni: EniView) -> Decision | None:
    missing = [role for role in VOLUME_ROLES if view.volume(role) is None]
    if missing and cfg.volumes == "per-instance":
        devices = ", ".join(f"{PER_INSTANCE_DEVICES[r]} ({r})" for r in missing)
        return _wait(
            f"waiting: this instance has no EBS volume at {devices}: the launch template must map all three "
            f"(re-run `kafka-asg up`)"
        )
    if cfg.volumes != "per-slot":
        return None
    if missing:
        return _wait(
            f"waiting: slot {eni.slot} has no {', '.join(missing)} volume tagged for {cfg.name} "
            f"(run `kafka-asg up`); not starting without all three"
        )
    wrong_az = [v for v in view.volumes if v.az != view.identity.az]
    if wrong_az:
        v = wrong_az[0]
        return Decision(
            Refuse(f"volume {v.volume_id} (slot {v.slot} {v.role}) is in {v.az}, this instance in {view.identity.az}"),
            f"refused: volume {v.volume_id} (slot {v.slot} {v.role}) is in {v.az}, not {view.identity.az}: "
            f"EBS volumes attach only within their AZ; fix the slot's volume tags",
            "refused",
        )
    held = [v for v in view.volumes if v.attached_to not in (None, view.instance_id)]
    if held:
        return _volume_held(view, held[0])
    free = [v for v in view.volumes if v.attached_to is None]
    if free:
        ordered = sorted(free, key=lambda v: VOLUME_ROLES.index(_role(v)))
        return Decision(
            AttachVolumes(tuple((v.volume_id, VOLUME_DEVICES[_role(v)]) for v in ordered)),
            f"attaching slot {eni.slot} volumes: " + ", ".join(f"{v.volume_id} ({v.role})" for v in ordered),
            "booting",
        )
    return None


def _volume_held(view: NodeView, vol: VolumeView) -> Decision:
    state = view.holders.get(vol.attached_to or "") or "gone from EC2"
    return _wait(
        f"waiting: {vol.volume_id} (slot {vol.slot} {vol.role}) is attached to {vol.attached_to} ({state}); "
        f"not starting without all three volumes"
    )


def _role(vol: VolumeView) -> VolumeRole:
    for role in VOLUME_ROLES:
        if vol.role == role:
            return role
    raise ValueError(f"volume {vol.volume_id} has unknown role {vol.role!r}")


def _configure_nic(view: NodeView, cfg: ClusterConfig, eni: EniView) -> Decision | None:
    nic = view.nic
    if nic is None:
        return _wait(f"waiting: the NIC of {eni.eni_id} (MAC {eni.mac}) is not visible to the OS yet", pace="device")
    if nic.up and eni.ip in nic.addresses and nic.has_policy_route:
        return None
    table = ROUTE_TABLE_BASE + ENI_DEVICE_INDEX
    return Decision(
        ConfigureNic(nic.ifname, eni.ip, view.identity.subnet_cidr, table),
        f"configuring {nic.ifname} ({eni.eni_id}): {eni.ip}/{view.identity.subnet_cidr.prefixlen}, "
        f"policy routing via table {table}",
        "booting",
    )


def _prepare_disks(view: NodeView, cfg: ClusterConfig, eni: EniView) -> Decision | None:
    unmounted: list[tuple[VolumeRole, VolumeMount, str]] = []
    for role in VOLUME_ROLES:
        vol = view.volume(role)
        assert vol is not None  # _claim_volumes returned early otherwise
        disk = view.disks.get(vol.volume_id)
        if disk is None:
            return _wait(
                f"waiting: volume {vol.volume_id} ({role}) is not visible under /dev/disk/by-id yet", pace="device"
            )
        if disk.filesystem is None:
            # mkfs only on a device with no filesystem at all: a replacement keeps the slot's data.
            return Decision(
                MakeFilesystem(vol.volume_id, disk.device, f"{role}{eni.slot}"),
                f"making a filesystem on {disk.device} ({vol.volume_id}, {role}): it has none",
                "booting",
            )
        if disk.filesystem.startswith(PARTITION_TABLE):
            # Someone's partitioned disk: not ours to mount whole, never ours to format.
            return Decision(
                Refuse(f"volume {vol.volume_id} ({role}) holds a {disk.filesystem}, not a filesystem"),
                f"refused: volume {vol.volume_id} ({role}) at {disk.device} holds a {disk.filesystem}, not a "
                f"filesystem: kafka-asg mounts a whole device and never formats one that holds anything",
                "refused",
            )
        mountpoint = view.mountpoints[role]
        if disk.mounted_at is None or str(disk.mounted_at) != str(mountpoint):
            unmounted.append(
                (role, VolumeMount(vol.volume_id, disk.device, Path(mountpoint), disk.filesystem), disk.filesystem)
            )
    if not unmounted:
        return None
    return Decision(
        Mount(tuple(m for _, m, _ in unmounted)),
        "mounting "
        + "; ".join(f"{m.device} ({m.volume_id}, {role}, {fs}) at {m.mountpoint}" for role, m, fs in unmounted),
        "booting",
    )


def _check_identity(view: NodeView, cfg: ClusterConfig, eni: EniView) -> Decision | None:
    """Data on the volumes must belong to this cluster and slot; anything else is refused, never reused."""
    slot = eni.slot
    for role in VOLUME_ROLES:
        marker = view.markers.get(role)
        vol = view.volume(role)
        vol_id = vol.volume_id if vol else "?"
        if marker is None:
            foreign = _unmarked_identity(view, role)
            if foreign:
                return _refuse(f"{vol_id} ({role}) has no kafka-asg marker but holds {foreign}")
            want = VolumeMarker(cluster=cfg.name, slot=slot, role=role)
            return Decision(
                InitVolume(role, Path(view.mountpoints[role]), want),
                f"marking {vol_id} as {cfg.name} slot {slot} {role}",
                "booting",
            )
        if marker.error:
            return _refuse(f"{vol_id} ({role}): {marker.error}")
        if (marker.cluster, marker.slot, marker.role) != (cfg.name, slot, role):
            return _refuse(
                f"{vol_id} ({role}) belongs to cluster {marker.cluster} slot {marker.slot} {marker.role}, "
                f"not {cfg.name} slot {slot} {role}"
            )
    if view.zk_myid is not None and view.zk_myid != str(slot):
        return _refuse(f"zookeeper myid on the zk-data volume is {view.zk_myid!r}, not {slot}")
    meta = view.kafka_meta
    if meta is not None:
        broker = meta.get("broker.id")
        if broker is not None and broker != str(slot):
            return _refuse(f"kafka meta.properties on the kafka-log volume has broker.id={broker}, not {slot}")
        recorded = (view.markers.get("kafka-log") or VolumeMarker(cfg.name, slot, "kafka-log")).kafka_cluster_id
        cluster_id = meta.get("cluster.id")
        if recorded and cluster_id and cluster_id != recorded:
            return _refuse(
                f"kafka meta.properties has cluster.id={cluster_id}, but this volume was formatted for "
                f"kafka cluster {recorded}"
            )
    return None


def _unmarked_identity(view: NodeView, role: VolumeRole) -> str | None:
    """An unmarked volume is adopted only when it carries no server identity (a crash between mkfs and
    marker); data of unknown origin is never reused."""
    if role == "zk-data" and view.zk_myid is not None:
        return f"a zookeeper myid ({view.zk_myid})"
    if role == "kafka-log" and view.kafka_meta is not None:
        meta = view.kafka_meta
        return f"kafka data (meta.properties broker.id={meta.get('broker.id')} cluster.id={meta.get('cluster.id')})"
    return None


def _refuse(reason: str) -> Decision:
    return Decision(Refuse(reason), f"refused: {reason}; not starting zookeeper or kafka", "refused")


def _supervise(view: NodeView, cfg: ClusterConfig, eni: EniView) -> Decision:
    zk = _start_or_restart(view, "zookeeper", f"server.{eni.slot}, {eni.ip}:{cfg.ports.zk_client}")
    if zk is not None:
        return zk
    if "kafka" not in view.memory.installed:
        # Kafka's archive unpacks while ZooKeeper starts and joins the quorum (both in the prefetch, begun at boot):
        # installed before the wait, the quorum's arrival starts Kafka in the very next cycle.
        return Decision(Install("kafka"), f"installing kafka {cfg.kafka.version}", "booting")
    if view.zk_mode not in SERVING_ZK_MODES:
        return _wait(f"waiting: zookeeper quorum not formed (mode: {view.zk_mode})", pace="soon")
    if view.leftover_registration and not view.server("kafka").running:
        # A second broker with this id would fail with NodeExists (and crash-loop into the backoff) until the
        # previous holder's ZooKeeper session expires (zookeeper.session.timeout.ms after it died); or it is
        # still alive somewhere, and then it must never get a twin.
        return _wait(
            f"waiting: /brokers/ids/{eni.slot} still holds a previous broker {eni.slot}'s registration "
            "(its zookeeper session has not expired); starting kafka once it is gone",
            # A wait on another instance (the dead broker's session, up to the 18 s session timeout): the node's
            # deletion wakes the loop at once (a ZooKeeper watch), so polling is only the fallback.
            pace="watched",
        )
    kafka = _start_or_restart(view, "kafka", f"broker {eni.slot}, {eni.ip}:{cfg.ports.kafka}")
    if kafka is not None:
        return kafka
    if not view.broker_registered:
        # The registration wakes the loop (the same watch); the fallback poll also notices a Kafka that died starting.
        return _wait(
            f"waiting: broker {eni.slot} not registered in zookeeper yet (zookeeper {view.zk_mode})", pace="watched"
        )
    marker = view.markers.get("kafka-log")
    cluster_id = (view.kafka_meta or {}).get("cluster.id")
    if marker is not None and cluster_id and marker.kafka_cluster_id is None:
        return Decision(
            RecordKafkaClusterId(
                Path(view.mountpoints["kafka-log"]),
                VolumeMarker(marker.cluster, marker.slot, marker.role, kafka_cluster_id=cluster_id),
            ),
            f"recording kafka cluster.id {cluster_id} in the kafka-log volume's marker",
            "serving",
        )
    return Decision(NoAction(), f"no action: zookeeper {view.zk_mode}, broker {eni.slot} registered", "serving")


def _start_or_restart(view: NodeView, name: ServerName, what: str) -> Decision | None:
    server = view.server(name)
    if server.running:
        return None
    # ``restarts`` counts exits; the Services implementation sets the backoff (next_start_at).
    if server.restarts == 0 and server.next_start_at is None:
        return Decision(StartServer(name, restart=False), f"starting {name} ({what})", "booting")
    if server.next_start_at is not None and view.now < server.next_start_at:
        wait = server.next_start_at - view.now
        return _wait(f"waiting: {name} exited ({server.restarts}x); restarting in {wait:.0f}s (backoff)")
    return Decision(
        StartServer(name, restart=True), f"restarting {name} ({what}; it exited {server.restarts}x)", "booting"
    )
