"""In-memory fakes of the agent's interfaces: explicit state like moto's backends, no magic mocks.

One :class:`FakeWorld` holds what outlives an instance (ENIs, volumes with their filesystems and files,
instances, S3 objects); a :class:`FakeCloud` is the EC2/ASG/S3 API over it, and a :class:`FakeHost` is one
instance's OS view of it (a NIC appears when EC2 says the ENI is attached to *this* instance; a volume's
files follow the volume to its next instance). ``attach`` raises ``ClaimLost`` on a double attach, as EC2
does (and as moto does not).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
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
from kafka_asg.config import PER_INSTANCE_DEVICES
from kafka_asg.errors import ClaimLost, HostError, NotFoundError, ServiceError, Unavailable


class FakeClock:
    """Monotonic and wall clock in one; ``sleep`` advances both."""

    def __init__(self, start: float = 1000.0, wall: float = 1_790_000_000.0) -> None:
        self.now = start
        self.wall_offset = wall - start

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now + self.wall_offset

    def cpu(self) -> tuple[float, float]:
        return 0.0, 0.0  # the tests measure no CPU

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def advance(self, seconds: float) -> None:
        self.now += seconds


# ------------------------------------------------------------------------------------ IMDS


class FakeImds(Imds):
    def __init__(self, identity: InstanceIdentity, lifecycle: str | None = "InService") -> None:
        self._identity = identity
        self.lifecycle = lifecycle
        self.device_numbers: dict[str, int] = {}
        self.credentials: dict[str, str] | None = {"AccessKeyId": "AKIDFAKE", "SecretAccessKey": "fake", "Token": "t"}

    def identity(self) -> InstanceIdentity:
        return self._identity

    def target_lifecycle_state(self) -> str | None:
        return self.lifecycle

    def nic_device_number(self, mac: str) -> int | None:
        return self.device_numbers.get(mac)

    def role_credentials(self) -> Mapping[str, str]:
        if self.credentials is None:
            raise NotFoundError("IMDS lists no role under iam/security-credentials/")
        return self.credentials


# ----------------------------------------------------------------------------------- world


@dataclass
class FakeVolume:
    volume_id: str
    slot: int
    role: str
    az: str
    attached_to: str | None = None
    device: str | None = None
    filesystem: str | None = None  # what blkid would say
    label: str | None = None
    files: dict[str, bytes] = field(default_factory=dict)  # path relative to the volume root -> bytes


@dataclass
class FakeEni:
    eni_id: str
    slot: int
    ip: IPv4Address
    mac: str
    subnet_id: str
    cluster: str
    attached_to: str | None = None


@dataclass
class FakeWorld:
    """What outlives one instance: the region's EC2/ASG/S3 state."""

    enis: dict[str, FakeEni] = field(default_factory=dict)
    volumes: dict[str, FakeVolume] = field(default_factory=dict)
    volume_cluster: dict[str, str] = field(default_factory=dict)
    instances: dict[str, InstanceState] = field(default_factory=dict)
    objects: dict[tuple[str, str], bytes] = field(default_factory=dict)
    tags: dict[str, dict[str, str]] = field(default_factory=dict)
    protected: dict[str, bool] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)

    def add_eni(self, cluster: str, slot: int, ip: str, subnet_id: str, eni_id: str | None = None) -> FakeEni:
        eni = FakeEni(
            eni_id=eni_id or f"eni-{slot:04d}",
            slot=slot,
            ip=IPv4Address(ip),
            mac=f"02:00:00:00:01:{slot:02x}",
            subnet_id=subnet_id,
            cluster=cluster,
        )
        self.enis[eni.eni_id] = eni
        return eni

    def add_volume(self, cluster: str, slot: int, role: str, az: str) -> FakeVolume:
        vol = FakeVolume(volume_id=f"vol-{slot}{role.replace('-', '')}", slot=slot, role=role, az=az)
        self.volumes[vol.volume_id] = vol
        self.volume_cluster[vol.volume_id] = cluster
        return vol

    def add_instance_volumes(self, cluster: str, instance_id: str, az: str) -> list[FakeVolume]:
        """Per-instance mode: the launch template's three volumes, attached at launch at /dev/sdb..sdd."""
        made = []
        for role, device in PER_INSTANCE_DEVICES.items():
            vol = FakeVolume(f"vol-{instance_id}-{role}", 0, role, az, attached_to=instance_id, device=device)
            self.volumes[vol.volume_id] = vol
            self.volume_cluster[vol.volume_id] = ""  # not tagged as a slot volume
            made.append(vol)
        return made

    def put_object(self, bucket: str, key: str, data: bytes) -> None:
        self.objects[(bucket, key)] = data

    def put_with_manifest(self, bucket: str, objects: Mapping[str, bytes]) -> None:
        """Upload objects plus ``manifest.json`` = {"files": {key: {"sha256", "size"}}} as provisioning does."""
        files = {}
        for key, data in objects.items():
            self.put_object(bucket, key, data)
            files[key] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        self.put_object(bucket, "manifest.json", json.dumps({"files": files}).encode())

    def terminate(self, instance_id: str) -> None:
        """EC2 terminates an instance: its attachments are released."""
        self.instances[instance_id] = "terminated"
        for eni in self.enis.values():
            if eni.attached_to == instance_id:
                eni.attached_to = None
        for vol in self.volumes.values():
            if vol.attached_to == instance_id:
                vol.attached_to, vol.device = None, None


# ----------------------------------------------------------------------------------- Cloud


class FakeCloud(Cloud):
    """EC2/ASG/S3 over a :class:`FakeWorld`. ``race`` lets a test make another instance win an attach:
    ``race[eni_or_volume_id] = instance_id`` attaches it to that instance just before our call."""

    def __init__(self, world: FakeWorld) -> None:
        self.world = world
        self.race: dict[str, str] = {}
        self.fail_next: list[Exception] = []  # raised by the next calls, in order (e.g. Unavailable)

    def _call(self, what: str) -> None:
        self.world.calls.append(what)
        if self.fail_next:
            raise self.fail_next.pop(0)

    def slot_enis(self, cluster: str, subnet_id: str) -> Sequence[EniView]:
        self._call("slot_enis")
        return [
            EniView(
                eni_id=e.eni_id,
                slot=e.slot,
                ip=e.ip,
                mac=e.mac,
                subnet_id=e.subnet_id,
                status="in-use" if e.attached_to else "available",
                attached_to=e.attached_to,
                attachment_status="attached" if e.attached_to else None,
            )
            for e in self.world.enis.values()
            if e.cluster == cluster and e.subnet_id == subnet_id
        ]

    def attach_eni(self, eni_id: str, instance_id: str, device_index: int) -> None:
        self._call(f"attach_eni {eni_id} {instance_id}")
        eni = self.world.enis.get(eni_id)
        if eni is None:
            raise NotFoundError(f"network interface {eni_id} does not exist")
        if eni_id in self.race:
            eni.attached_to = self.race.pop(eni_id)
        if eni.attached_to is not None:
            raise ClaimLost(eni_id, eni.attached_to, f"Interface: [{eni_id}] in use.")
        eni.attached_to = instance_id

    def slot_volumes(self, cluster: str, slot: int) -> Sequence[VolumeView]:
        self._call("slot_volumes")
        return [
            VolumeView(
                volume_id=v.volume_id,
                slot=v.slot,
                role=v.role,
                az=v.az,
                state="in-use" if v.attached_to else "available",
                attached_to=v.attached_to,
                device=v.device,
            )
            for v in self.world.volumes.values()
            if self.world.volume_cluster[v.volume_id] == cluster and v.slot == slot
        ]

    def attach_volume(self, volume_id: str, instance_id: str, device: str) -> None:
        self._call(f"attach_volume {volume_id} {instance_id}")
        vol = self.world.volumes.get(volume_id)
        if vol is None:
            raise NotFoundError(f"volume {volume_id} does not exist")
        if volume_id in self.race:
            vol.attached_to = self.race.pop(volume_id)
        if vol.attached_to is not None:
            raise ClaimLost(volume_id, vol.attached_to, f"{volume_id} is in use by {vol.attached_to}")
        vol.attached_to, vol.device = instance_id, device

    def instance_volumes(self, instance_id: str) -> Mapping[str, str]:
        self._call("instance_volumes")
        return {
            v.device: v.volume_id
            for v in self.world.volumes.values()
            if v.attached_to == instance_id and v.device is not None and v.slot == 0
        }

    def instance_state(self, instance_id: str) -> InstanceState | None:
        self._call(f"instance_state {instance_id}")
        return self.world.instances.get(instance_id)

    def set_scale_in_protection(self, asg_name: str, instance_id: str, protected: bool) -> None:
        self._call(f"set_scale_in_protection {instance_id} {protected}")
        self.world.protected[instance_id] = protected

    def report(self, instance_id: str, tags: Mapping[str, str]) -> None:
        self._call("report")
        self.world.tags.setdefault(instance_id, {}).update(tags)

    def get_object(self, bucket: str, key: str) -> bytes:
        self._call(f"get_object {key}")
        try:
            return self.world.objects[(bucket, key)]
        except KeyError:
            raise NotFoundError(f"s3://{bucket}/{key} does not exist") from None

    def download(self, bucket: str, key: str, dest: Path) -> str:
        data = self.get_object(bucket, key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------ Host


class FakeHost(Host):
    """One instance's OS, derived from the world: NICs and disks are those EC2 attached to this instance."""

    def __init__(self, world: FakeWorld, instance_id: str) -> None:
        self.world = world
        self.instance_id = instance_id
        self.nic_config: dict[str, tuple[IPv4Address, int]] = {}  # mac -> (ip, table)
        self.mounts: dict[str, PurePosixPath] = {}  # volume id -> mountpoint
        self.files: dict[str, bytes] = {}  # root disk: absolute path -> bytes
        self.mkfs_calls: list[str] = []
        self.removed_dirs: list[str] = []
        self.plugging: set[str] = set()  # volume ids attached in EC2 but not shown by the OS yet (hot-plug)

    def _eni_by_mac(self, mac: str) -> FakeEni | None:
        return next((e for e in self.world.enis.values() if e.mac == mac), None)

    def nic_by_mac(self, mac: str) -> NicState | None:
        eni = self._eni_by_mac(mac)
        if eni is None or eni.attached_to != self.instance_id:
            return None
        conf = self.nic_config.get(mac)
        return NicState(
            ifname=f"ens{5 + eni.slot}",
            mac=mac,
            up=conf is not None,
            addresses=(conf[0],) if conf else (),
            has_policy_route=conf is not None,
        )

    def configure_nic(self, ifname: str, ip: IPv4Address, subnet: IPv4Network, table: int) -> None:
        eni = next((e for e in self.world.enis.values() if e.attached_to == self.instance_id and e.ip == ip), None)
        if eni is None:
            raise HostError(f"no NIC {ifname} with {ip} on {self.instance_id}")
        self.nic_config[eni.mac] = (ip, table)

    def _device(self, volume_id: str) -> Path:
        return Path(f"/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_{volume_id.replace('-', '')}")

    def _volume_by_device(self, device: Path) -> FakeVolume:
        for vol in self.world.volumes.values():
            if vol.attached_to == self.instance_id and self._device(vol.volume_id) == device:
                return vol
        raise HostError(f"no block device {device} on {self.instance_id}")

    def disk(self, volume_id: str) -> DiskState | None:
        vol = self.world.volumes.get(volume_id)
        if vol is None or vol.attached_to != self.instance_id:
            self.mounts.pop(volume_id, None)
            return None
        if volume_id in self.plugging:
            return None
        mounted = self.mounts.get(volume_id)
        return DiskState(
            device=self._device(volume_id),
            filesystem=vol.filesystem,
            label=vol.label,
            mounted_at=Path(mounted) if mounted else None,
        )

    def make_filesystem(self, device: Path, label: str) -> None:
        vol = self._volume_by_device(device)
        if vol.filesystem is not None:
            raise HostError(f"refusing to format {device}: it has a {vol.filesystem} filesystem")
        self.mkfs_calls.append(vol.volume_id)
        vol.filesystem, vol.label, vol.files = "ext4", label, {"lost+found/": b""}

    def mount(self, device: Path, mountpoint: Path, filesystem: str) -> None:
        vol = self._volume_by_device(device)
        if vol.filesystem is None:
            raise HostError(f"mount {device}: no filesystem")
        if filesystem != vol.filesystem:
            raise HostError(f"mount {device} as {filesystem}: it holds {vol.filesystem}")
        self.mounts[vol.volume_id] = PurePosixPath(mountpoint)

    def _locate(self, path: Path) -> tuple[FakeVolume | None, str]:
        """The volume mounted over ``path`` (longest mountpoint wins) and the path inside it."""
        best: tuple[FakeVolume | None, str] = (None, str(path))
        best_len = -1
        for vol_id, mp in self.mounts.items():
            vol = self.world.volumes[vol_id]
            if vol.attached_to != self.instance_id:
                continue
            try:
                rel = PurePosixPath(path).relative_to(mp)
            except ValueError:
                continue
            if len(str(mp)) > best_len:
                best, best_len = (vol, str(rel)), len(str(mp))
        return best

    def read_file(self, path: Path) -> str | None:
        vol, rel = self._locate(path)
        data = vol.files.get(rel) if vol is not None else self.files.get(rel)
        return data.decode() if data is not None else None

    def write_file(self, path: Path, data: str | bytes, mode: int = 0o644, *, durable: bool = True) -> None:
        raw = data.encode() if isinstance(data, str) else data
        vol, rel = self._locate(path)
        if vol is not None:
            vol.files[rel] = raw
        else:
            self.files[rel] = raw

    def remove_empty_dir(self, path: Path) -> None:
        vol, rel = self._locate(path)
        if vol is not None:
            vol.files.pop(rel + "/", None)
        self.removed_dirs.append(str(path))


# -------------------------------------------------------------------------------- Services


@dataclass
class FakeServer:
    running: bool = False
    pid: int | None = None
    restarts: int = 0
    next_start_at: float | None = None
    starts: int = 0
    config: Path | None = None
    started_at: float | None = None


class FakeServices(Services):
    """ZooKeeper and Kafka as state. ZooKeeper serves in ``zk_mode_when_running`` once started; Kafka
    registers ``registration_delay`` seconds after it starts, while ZooKeeper serves. ``crash`` sets the
    backoff like the real one (restarts counts exits; next start = exit + min(2**restarts, 60) s).
    ``leftover_registration``: a predecessor's /brokers/ids node, until its session expires.
    One clock (``clock``) stands for both the monotonic and the wall clock."""

    def __init__(self, clock: Callable[[], float], zk_mode_when_running: ZkMode = "follower") -> None:
        self.clock = clock
        self.servers: dict[ServerName, FakeServer] = {"zookeeper": FakeServer(), "kafka": FakeServer()}
        self.zk_mode_when_running: ZkMode = zk_mode_when_running
        self.installed: dict[ServerName, Path] = {}
        self.events: list[str] = []
        self.meta_writer: Callable[[], None] | None = None  # e.g. Kafka writing meta.properties at start
        self.registration_delay = 0.0
        self.wake: Callable[[], None] | None = None  # from on_change: a test calls it as a ZooKeeper watch would
        # A predecessor's /brokers/ids node: (registered at, its session expires at).
        self.leftover_registration: tuple[float, float] | None = None
        self._next_pid = 100

    def install(self, name: ServerName, archive: Path) -> Path:
        if not archive.exists():
            raise ServiceError(f"archive {archive} is missing")
        self.installed[name] = Path(f"/opt/kafka-asg/{archive.name}")
        self.events.append(f"install {name}")
        return self.installed[name]

    def start(self, name: ServerName, config: Path, env: Mapping[str, str]) -> None:
        if name not in self.installed:
            raise ServiceError(f"{name} is not installed")
        server = self.servers[name]
        if server.running:
            return
        self._next_pid += 1
        server.running, server.pid, server.starts, server.config = True, self._next_pid, server.starts + 1, config
        server.started_at = self.clock()
        self.events.append(f"start {name}")
        if name == "kafka" and self.meta_writer is not None:
            self.meta_writer()

    def stop(self, name: ServerName, timeout: float) -> None:
        server = self.servers[name]
        if server.running:
            self.events.append(f"stop {name}")
        server.running, server.pid = False, None

    def crash(self, name: ServerName) -> None:
        server = self.servers[name]
        server.running, server.pid = False, None
        server.restarts += 1  # counts exits, as ProcessServices does
        server.next_start_at = self.clock() + min(2**server.restarts, 60)
        self.events.append(f"crash {name}")

    def state(self, name: ServerName) -> ServerState:
        s = self.servers[name]
        return ServerState(name, s.running, s.pid, s.restarts, s.next_start_at, s.started_at if s.running else None)

    def zk_mode(self, address: IPv4Address, port: int) -> ZkMode:
        return self.zk_mode_when_running if self.servers["zookeeper"].running else "down"

    def on_change(self, wake: Callable[[], None]) -> None:
        self.wake = wake

    def broker_registration(self, zk_connect: str, broker_id: int) -> float | None:
        if self.zk_mode(IPv4Address("127.0.0.1"), 0) not in SERVING_ZK_MODES:
            raise Unavailable("zookeeper is not serving")
        now = self.clock()
        if self.leftover_registration is not None and now < self.leftover_registration[1]:
            return self.leftover_registration[0]  # its owner's; ours would fail with NodeExists meanwhile
        kafka = self.servers["kafka"]
        if kafka.running and kafka.started_at is not None and now >= kafka.started_at + self.registration_delay:
            return kafka.started_at + self.registration_delay
        return None


def eni_view(eni: FakeEni) -> EniView:
    """The EniView EC2 would describe for a fake ENI (handy in tests)."""
    status = "in-use" if eni.attached_to else "available"
    return replace(
        EniView(eni.eni_id, eni.slot, eni.ip, eni.mac, eni.subnet_id, status, eni.attached_to, None),
        attachment_status="attached" if eni.attached_to else None,
    )
