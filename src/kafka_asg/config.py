"""The cluster config (``cluster.toml``): a frozen, validated model.

Only this module reads the file. ``load_config`` validates offline and raises :class:`ConfigError` with
*every* problem found; nothing downstream re-checks what is validated here, and no command makes an AWS
call on an invalid file.

Slot number = ZooKeeper ``server.N`` / ``myid`` = Kafka ``broker.id``, as in the seed's ``server.N`` lines.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Literal

Mode = Literal["zookeeper", "kraft"]
VolumeMode = Literal["per-slot", "per-instance"]
VolumeRole = Literal["zk-data", "zk-txlog", "kafka-log"]

# The three data volumes of a slot, in the order of the seed's /dev/sdb, /dev/sdc, /dev/sdd.
VOLUME_ROLES: tuple[VolumeRole, ...] = ("zk-data", "zk-txlog", "kafka-log")
PER_INSTANCE_DEVICES: Mapping[VolumeRole, str] = {
    "zk-data": "/dev/sdb",
    "zk-txlog": "/dev/sdc",
    "kafka-log": "/dev/sdd",
}

# Tag keys: every resource carries CLUSTER_TAG; slot resources also SLOT_TAG; volumes also ROLE_TAG.
CLUSTER_TAG = "kafka-asg:cluster"
SLOT_TAG = "kafka-asg:slot"
ROLE_TAG = "kafka-asg:role"


@dataclass(frozen=True)
class Subnet:
    az: str
    cidr: IPv4Network

    @property
    def gateway(self) -> IPv4Address:
        """The VPC router's address in this subnet (AWS reserves base+1 for it)."""
        return self.cidr.network_address + 1


@dataclass(frozen=True)
class Slot:
    number: int  # ZooKeeper myid == Kafka broker.id
    az: str
    ip: IPv4Address
    subnet: Subnet


@dataclass(frozen=True)
class Ports:
    zk_client: int = 2181
    zk_quorum: int = 2888
    zk_election: int = 3888
    kafka: int = 9095


@dataclass(frozen=True)
class ServerSpec:
    """One server distribution (ZooKeeper or Kafka): its version and the archive in the bucket."""

    version: str
    archive_key: str  # S3 key in the cluster bucket, e.g. "archives/kafka_2.13-3.9.2.tgz"
    source: str | None = None  # where ``up`` takes it from: a local path or URL; None = build from Maven


@dataclass(frozen=True)
class AsgSize:
    min: int
    desired: int
    max: int


@dataclass(frozen=True)
class VolumeSpec:
    size_gib: int = 20
    volume_type: str = "gp3"
    encrypted: bool = True


@dataclass(frozen=True)
class ClusterConfig:
    name: str
    region: str
    mode: Mode
    vpc_cidr: IPv4Network
    vpc_id: str | None  # None: find the VPC whose CIDR is vpc_cidr
    subnets: tuple[Subnet, ...]
    slots: tuple[Slot, ...]
    ports: Ports
    bucket: str
    zookeeper_config: Path  # the base config file, as in the seed's S3 object "zookeeper.config"
    kafka_config: Path
    zookeeper: ServerSpec
    kafka: ServerSpec
    volumes: VolumeMode
    volume: VolumeSpec
    instance_type: str
    ami: str
    asg: AsgSize
    bastion_security_group: str | None
    tags: Mapping[str, str] = field(default_factory=dict)
    # How long a booting instance waits for a slot held by a shutting-down instance (seconds).
    claim_wait_seconds: int = 300

    # --- names of the resources, all derived from the cluster name ---------------------------------
    @property
    def eni_name(self) -> str:
        return f"{self.name}-eni"

    @property
    def security_group_name(self) -> str:
        return f"{self.name}-sg"

    @property
    def role_name(self) -> str:
        return f"{self.name}-role"

    @property
    def instance_profile_name(self) -> str:
        return f"{self.name}-profile"

    @property
    def launch_template_name(self) -> str:
        return f"{self.name}-launch-template"

    @property
    def asg_name(self) -> str:
        return f"{self.name}-asg"

    def slot(self, number: int) -> Slot:
        for slot in self.slots:
            if slot.number == number:
                return slot
        raise KeyError(f"no slot {number} in cluster {self.name}")

    def base_tags(self) -> dict[str, str]:
        return {**self.tags, CLUSTER_TAG: self.name}
