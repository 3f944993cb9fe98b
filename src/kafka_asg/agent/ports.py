"""The node agent's side effects, each behind a small interface (Patroni's ``AbstractDCS`` style).

The agent's decisions (``agent/decide.py``) are pure functions of a frozen :class:`~agent.snapshot`
built from these; ``agent/fakes.py`` implements every interface in memory for unit tests.

Error contract, for every method: transient failures raise :class:`~kafka_asg.errors.Unavailable`
(already retried by :mod:`kafka_asg.retry` inside the implementation, bounded by its deadline);
losing a race for a slot resource raises :class:`~kafka_asg.errors.ClaimLost`; a missing object raises
:class:`~kafka_asg.errors.NotFoundError`; OS failures raise ``HostError``; server failures ``ServiceError``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Literal

# ----------------------------------------------------------------------------------------- IMDS


@dataclass(frozen=True)
class InstanceIdentity:
    """What IMDSv2 tells an instance about itself."""

    instance_id: str
    region: str
    az: str
    az_id: str
    mac: str  # primary NIC
    subnet_id: str
    subnet_cidr: IPv4Network
    vpc_id: str
    local_ipv4: IPv4Address


class Imds(ABC):
    """IMDSv2 client: token PUT, then GETs with the token (cloud-init's ``DataSourceEc2`` behaviour)."""

    @abstractmethod
    def identity(self) -> InstanceIdentity: ...

    @abstractmethod
    def target_lifecycle_state(self) -> str | None:
        """``autoscaling/target-lifecycle-state`` (e.g. ``InService``, ``Warmed:Stopped``), None if absent."""

    @abstractmethod
    def nic_device_number(self, mac: str) -> int | None:
        """``network/interfaces/macs/<mac>/device-number``; None until IMDS knows the NIC."""

    @abstractmethod
    def role_credentials(self) -> Mapping[str, str]:
        """The instance role's temporary credentials, ``iam/security-credentials/<role>`` (``AccessKeyId``,
        ``SecretAccessKey``, ``Token``, ``Expiration``); ``NotFoundError`` while the instance has none."""


# ---------------------------------------------------------------------------------------- Cloud

InstanceState = Literal["pending", "running", "shutting-down", "terminated", "stopping", "stopped"]


@dataclass(frozen=True)
class EniView:
    eni_id: str
    slot: int
    ip: IPv4Address
    mac: str
    subnet_id: str
    status: str  # "available" | "in-use" | "attaching" | "detaching"
    attached_to: str | None  # instance id of the current attachment, if any
    attachment_status: str | None  # "attaching" | "attached" | "detaching" | "detached"


@dataclass(frozen=True)
class VolumeView:
    volume_id: str
    slot: int
    role: str  # zk-data | zk-txlog | kafka-log
    az: str
    state: str  # "available" | "in-use" | "creating" | ...
    attached_to: str | None
    device: str | None  # the API device name of the attachment (e.g. /dev/sdf)


class Cloud(ABC):
    """EC2, Auto Scaling and S3, as the agent needs them (their HTTP APIs in ``agent/aws.py``)."""

    @abstractmethod
    def slot_enis(self, cluster: str, subnet_id: str) -> Sequence[EniView]:
        """The cluster's slot ENIs in this subnet (found by tags, never by guessing)."""

    @abstractmethod
    def attach_eni(self, eni_id: str, instance_id: str, device_index: int) -> None:
        """The attach call is the lock. ``ClaimLost`` on ``InvalidNetworkInterface.InUse``."""

    @abstractmethod
    def slot_volumes(self, cluster: str, slot: int) -> Sequence[VolumeView]: ...

    @abstractmethod
    def attach_volume(self, volume_id: str, instance_id: str, device: str) -> None:
        """``ClaimLost`` on ``VolumeInUse``."""

    @abstractmethod
    def instance_volumes(self, instance_id: str) -> Mapping[str, str]:
        """Per-instance volume mode: the instance's EBS block device mappings, API device name (``/dev/sdb``)
        -> volume id (the launch template's volumes, new with every instance)."""

    @abstractmethod
    def instance_state(self, instance_id: str) -> InstanceState | None:
        """State of another instance (the holder of a slot); None if EC2 no longer knows it."""

    @abstractmethod
    def set_scale_in_protection(self, asg_name: str, instance_id: str, protected: bool) -> None: ...

    @abstractmethod
    def report(self, instance_id: str, tags: Mapping[str, str]) -> None:
        """Publish the agent's state as tags on its own instance (read by ``kafka-asg status``)."""

    @abstractmethod
    def get_object(self, bucket: str, key: str) -> bytes:
        """``NotFoundError`` naming bucket and key when the object is missing."""

    @abstractmethod
    def download(self, bucket: str, key: str, dest: Path) -> str:
        """Write the object to ``dest``; return the sha256 (hex) of the bytes written, hashed on the way (a
        second pass over a 60 MB archive cost as much CPU as the download)."""


# ----------------------------------------------------------------------------------------- Host


@dataclass(frozen=True)
class NicState:
    ifname: str
    mac: str
    up: bool
    addresses: tuple[IPv4Address, ...]
    has_policy_route: bool  # "ip rule from <addr> lookup <table>" present with a default route in it


# What DiskState.filesystem says of a device that holds a partition table (and no filesystem of its own).
PARTITION_TABLE = "partition table "


@dataclass(frozen=True)
class DiskState:
    device: Path  # resolved block device
    filesystem: str | None  # blkid TYPE, or PARTITION_TABLE + blkid PTTYPE; None = nothing found
    label: str | None
    mounted_at: Path | None


class Host(ABC):
    """The instance's operating system: NICs, block devices, filesystems (``agent/linux.py``)."""

    @abstractmethod
    def nic_by_mac(self, mac: str) -> NicState | None: ...

    @abstractmethod
    def configure_nic(self, ifname: str, ip: IPv4Address, subnet: IPv4Network, table: int) -> None:
        """Address, link up, and policy routing so replies from ``ip`` leave through ``ifname``:
        ``ip rule from <ip> lookup <table>`` + default via the subnet router in that table (what AL2023's
        amazon-ec2-net-utils installs: table 10000+device-number)."""

    @abstractmethod
    def disk(self, volume_id: str) -> DiskState | None:
        """The volume's block device, found under /dev/disk/by-id by volume id; None if not (yet) there."""

    def shows(self, volume_id: str) -> bool:
        """Whether the volume's device is there (a cheap look, for the pause between two cycles)."""
        return self.disk(volume_id) is not None

    def disks(self, volume_ids: Sequence[str]) -> dict[str, DiskState | None]:
        """:meth:`disk` of each volume (an implementation may look at them all at once)."""
        return {volume_id: self.disk(volume_id) for volume_id in volume_ids}

    @abstractmethod
    def make_filesystem(self, device: Path, label: str) -> None:
        """mkfs.ext4. Callers must have checked ``filesystem is None``; implementations re-check with blkid
        and raise HostError rather than format a device that has a filesystem."""

    @abstractmethod
    def mount(self, device: Path, mountpoint: Path, filesystem: str) -> None:
        """Mount ``device`` (holding a ``filesystem``, as a probe found it) at ``mountpoint``."""

    @abstractmethod
    def read_file(self, path: Path) -> str | None:
        """None if the file does not exist."""

    @abstractmethod
    def write_file(self, path: Path, data: str | bytes, mode: int = 0o644, *, durable: bool = True) -> None:
        """Atomic write; ``durable=False``: no fsync (for what the agent writes again before anything reads it
        after a power loss)."""

    @abstractmethod
    def remove_empty_dir(self, path: Path) -> None:
        """Remove ``path`` if it is an *empty* directory; no-op when absent or not empty. The agent clears the
        empty ``lost+found`` that mkfs.ext4 leaves in a fresh Kafka log dir: Kafka refuses to start when its
        log dir holds a directory that is not a topic-partition."""


# -------------------------------------------------------------------------------------- Services

ServerName = Literal["zookeeper", "kafka"]
ZkMode = Literal["leader", "follower", "standalone", "not serving", "down"]
# The modes of a ZooKeeper that serves clients (in a quorum, or alone).
SERVING_ZK_MODES: frozenset[ZkMode] = frozenset({"leader", "follower", "standalone"})


@dataclass(frozen=True)
class ServerState:
    name: ServerName
    running: bool
    pid: int | None
    restarts: int
    next_start_at: float | None  # backoff: monotonic time before which no restart is attempted
    started_at: float | None = None  # wall clock start of the running process (None: not running)


class Services(ABC):
    """Install, run, supervise and probe ZooKeeper and Kafka (``agent/servers.py``)."""

    @abstractmethod
    def install(self, name: ServerName, archive: Path) -> Path:
        """Unpack the archive (once per version) and return the install directory."""

    @abstractmethod
    def start(self, name: ServerName, config: Path, env: Mapping[str, str]) -> None: ...

    @abstractmethod
    def stop(self, name: ServerName, timeout: float) -> None:
        """SIGTERM (Kafka: controlled shutdown), then SIGKILL after ``timeout``."""

    @abstractmethod
    def state(self, name: ServerName) -> ServerState: ...

    @abstractmethod
    def zk_mode(self, address: IPv4Address, port: int) -> ZkMode:
        """``srvr`` and *read* the answer: ``srvr`` answers even when the server is not in a quorum."""

    @abstractmethod
    def broker_registration(self, zk_connect: str, broker_id: int) -> float | None:
        """When ``/brokers/ids/<id>`` was registered (wall clock seconds), None if it does not exist."""

    def on_change(self, wake: Callable[[], None]) -> None:
        """Have ``wake`` called, from any thread, when something a probe looked at changes; the loop then looks
        again at once instead of at its next poll. Without it (this default) the loop only polls."""
        del wake
