"""The cluster config (``cluster.toml``): a frozen, validated model.

Only this module reads the file. ``load_config`` validates offline and raises :class:`ConfigError` with
*every* problem found; nothing downstream re-checks what is validated here, and no command makes an AWS
call on an invalid file.

Slot number = ZooKeeper ``server.N`` / ``myid`` = Kafka ``broker.id``, as in the seed's ``server.N`` lines.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

from kafka_asg.errors import ConfigError
from kafka_asg.fsutil import read_properties

_T = TypeVar("_T")

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

# Latest Amazon Linux 2023, resolved by EC2 at launch from AWS's public SSM parameter
# (https://docs.aws.amazon.com/autoscaling/ec2/userguide/using-systems-manager-parameters.html).
DEFAULT_AMI = "resolve:ssm:/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"


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


# ============================================================================ loading & validation

logger = logging.getLogger(__name__)

SEED_DIR = Path(__file__).parent / "seed"
DEFAULT_CONFIG_PATH = Path("cluster.toml")
DOCUMENT_VERSION = 1

# Keys the node agent renders per node; a base config that sets them would give every broker the same value.
AGENT_OWNED_KAFKA_KEYS = ("broker.id", "node.id", "listeners", "advertised.listeners", "broker.rack")
VOLUME_TYPES = ("gp3", "gp2", "io1", "io2", "st1", "sc1")

_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,30}[a-z0-9]$")
_REGION_RE = re.compile(r"^[a-z]{2}(-gov|-iso[a-z]*)?-[a-z]+-\d$")
_VPC_ID_RE = re.compile(r"^vpc-([0-9a-f]{8}|[0-9a-f]{17})$")
_SG_ID_RE = re.compile(r"^sg-([0-9a-f]{8}|[0-9a-f]{17})$")
_AMI_RE = re.compile(r"^(ami-([0-9a-f]{8}|[0-9a-f]{17})|resolve:ssm:/\S+)$")
_INSTANCE_TYPE_RE = re.compile(r"^[a-z][a-z0-9-]*\.[a-z0-9]+$")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_SERVER_LINE_RE = re.compile(r"^server\.(\d+)$")


def _in_region(az: str, region: str) -> bool:
    """An AZ name is its region's name plus a letter (eu-west-1a)."""
    return re.match(rf"^{re.escape(region)}[a-z]$", az) is not None


def _subnet_prefix(vpc: IPv4Network) -> int:
    """Prefix of a derived subnet: the VPC's + 2 (four subnets, e.g. /26 -> /28), capped at /28, the
    smallest subnet AWS allows (https://docs.aws.amazon.com/vpc/latest/userguide/subnet-sizing.html)."""
    return min(vpc.prefixlen + 2, 28)


def reserved_addresses(cidr: IPv4Network) -> tuple[IPv4Address, ...]:
    """The 5 addresses AWS reserves in every subnet: network, router (+1), DNS (+2), future (+3), broadcast
    (https://docs.aws.amazon.com/vpc/latest/userguide/subnet-sizing.html)."""
    base = cidr.network_address
    return (base, base + 1, base + 2, base + 3, cidr.broadcast_address)


class _Problems:
    """Collects every problem (and warning) so the user sees them all at once."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def error(self, message: str) -> None:
        self.errors.append(message)

    def warn(self, message: str) -> None:
        self.warnings.append(message)


_TYPE_NAMES: dict[type, str] = {
    str: "a string",
    int: "an integer",
    bool: "true or false",
    dict: "a table",
    list: "an array of tables",
}


class _Table:
    """A TOML table read key by key; ``finish`` reports the keys nobody asked for as unknown."""

    def __init__(self, raw: Mapping[str, Any], where: str, problems: _Problems) -> None:
        self.raw = raw
        self.where = where
        self.problems = problems
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def get(self, name: str, kind: type[_T], default: _T | None = None, *, required: bool = False) -> _T | None:
        self.seen.add(name)
        if name not in self.raw:
            if required:
                self.problems.error(f"{self.key(name)}: missing; add it ({_TYPE_NAMES[kind]})")
            return default
        value = self.raw[name]
        # bool is an int in Python; TOML keeps them apart, so must we.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.problems.error(f"{self.key(name)}: must be {_TYPE_NAMES[kind]}, got {type(value).__name__} {value!r}")
            return None
        return value

    def table(self, name: str) -> _Table:
        raw = self.get(name, dict, {}) or {}
        return _Table(raw, self.key(name), self.problems)

    def finish(self) -> None:
        for name in self.raw:
            if name not in self.seen:
                self.problems.error(f"{self.key(name)}: unknown key; remove it or fix its spelling")


def _network(text: str | None, key: str, problems: _Problems) -> IPv4Network | None:
    if text is None:
        return None
    try:
        return IPv4Network(text)
    except ValueError as exc:
        problems.error(f"{key}: {text!r} is not an IPv4 CIDR block with host bits zero ({exc})")
        return None


def _address(text: str | None, key: str, problems: _Problems) -> IPv4Address | None:
    if text is None:
        return None
    try:
        return IPv4Address(text)
    except ValueError:
        problems.error(f"{key}: {text!r} is not an IPv4 address")
        return None


def _check_bucket(name: str, problems: _Problems) -> None:
    # https://docs.aws.amazon.com/AmazonS3/latest/userguide/bucketnamingrules.html
    fix = "use 3-63 lowercase letters, digits, dots and hyphens, starting and ending with a letter or digit"
    if not _BUCKET_RE.match(name):
        problems.error(f"bucket: {name!r} is not a valid S3 bucket name; {fix}")
    elif ".." in name or ".-" in name or "-." in name:
        problems.error(f"bucket: {name!r} has adjacent dots/hyphens, which S3 rejects; {fix}")
    elif re.match(r"^\d+\.\d+\.\d+\.\d+$", name):
        problems.error(f"bucket: {name!r} looks like an IP address, which S3 rejects; {fix}")
    elif name.startswith(("xn--", "sthree-")) or name.endswith(("-s3alias", "--ol-s3")):
        problems.error(f"bucket: {name!r} uses a prefix or suffix S3 reserves; {fix}")


def _read_base_config(path: Path, key: str, problems: _Problems) -> dict[str, str] | None:
    if not path.is_file():
        problems.error(f"{key}: base config file {str(path)!r} does not exist; create it or fix the path")
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        problems.error(f"{key}: cannot read {str(path)!r} as UTF-8 text ({exc}); it must be a .properties file")
        return None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line and line[0] not in "#!" and "=" not in line and ":" not in line:
            problems.error(
                f"{key}: {str(path)!r} line {number} {line[:40]!r} is not key=value; "
                "the base config must be a Java .properties file"
            )
            return None
    return read_properties(text)


def _check_zookeeper_base(
    props: Mapping[str, str], key: str, slots: Sequence[Slot], ports: Ports, p: _Problems
) -> None:
    by_number = {s.number: s for s in slots}
    if "clientPort" in props and props["clientPort"] != str(ports.zk_client):
        p.error(
            f"{key}: clientPort={props['clientPort']} disagrees with ports.zookeeper_client={ports.zk_client}; "
            "make them equal (or drop clientPort from the base config)"
        )
    servers: dict[int, str] = {}
    for name, value in props.items():
        match = _SERVER_LINE_RE.match(name)
        if match:
            servers[int(match.group(1))] = value
    for number, value in sorted(servers.items()):
        slot = by_number.get(number)
        expected = f"{slot.ip}:{ports.zk_quorum}:{ports.zk_election}" if slot else None
        # ZooKeeper allows ";clientPort" and ":participant" suffixes; compare the address part only.
        address = value.split(";")[0]
        address = address.removesuffix(":participant").removesuffix(":observer")
        if slot is None:
            p.error(f"{key}: server.{number}={value} names no slot; add slot {number} or remove the line")
        elif address != expected:
            p.error(f"{key}: server.{number}={value} disagrees with slot {number}; it must be {expected}")
    if servers:
        for slot in slots:
            if slot.number not in servers:
                p.error(
                    f"{key}: has server.N lines but none for slot {slot.number}; add "
                    f"server.{slot.number}={slot.ip}:{ports.zk_quorum}:{ports.zk_election} "
                    "(or drop all server.N lines and the agent renders them from the slots)"
                )


def _check_kafka_base(props: Mapping[str, str], key: str, slots: Sequence[Slot], ports: Ports, p: _Problems) -> None:
    for owned in AGENT_OWNED_KAFKA_KEYS:
        if owned in props:
            p.error(f"{key}: sets {owned}, which the agent sets per node; remove it from the base config")
    connect = props.get("zookeeper.connect")
    if connect is None:
        return
    known = {f"{s.ip}:{ports.zk_client}" for s in slots}
    hosts = connect.split("/", 1)[0]  # an optional chroot follows the host list
    for entry in (h.strip() for h in hosts.split(",")):
        if entry not in known:
            p.error(
                f"{key}: zookeeper.connect entry {entry!r} is no slot's IP with ports.zookeeper_client "
                f"({ports.zk_client}); use {','.join(sorted(known))}"
            )


def _check_port(value: int | None, key: str, p: _Problems) -> int | None:
    if value is not None and not 1 <= value <= 65535:
        p.error(f"{key}: {value} is not a TCP port; use 1-65535")
        return None
    return value


def _parse(raw: Mapping[str, Any], base_dir: Path, p: _Problems) -> ClusterConfig | None:
    top = _Table(raw, "", p)
    name = top.get("name", str, required=True)
    if name is not None and not _NAME_RE.match(name):
        p.error(
            f"name: {name!r} is not a valid cluster name; use 2-32 lowercase letters, digits and hyphens, "
            "starting with a letter (it prefixes every resource name)"
        )
    region = top.get("region", str, required=True)
    if region is not None and not _REGION_RE.match(region):
        p.error(f"region: {region!r} is not an AWS region name like eu-west-1")
    mode = top.get("mode", str, "zookeeper")
    if mode == "kraft":
        p.error('mode: "kraft" is not supported yet (it comes with Kafka 4.x); use mode = "zookeeper"')
    elif mode is not None and mode != "zookeeper":
        p.error(f'mode: {mode!r} is not a mode; use "zookeeper"')
    volumes = top.get("volumes", str, "per-slot")
    if volumes is not None and volumes not in ("per-slot", "per-instance"):
        p.error(f'volumes: {volumes!r} is not a volume mode; use "per-slot" or "per-instance"')
    bucket = top.get("bucket", str, required=True)
    if bucket is not None:
        _check_bucket(bucket, p)
    instance_type = top.get("instance_type", str, "m6i.large")
    if instance_type is not None and not _INSTANCE_TYPE_RE.match(instance_type):
        p.error(f"instance_type: {instance_type!r} is not an EC2 instance type like m6i.large")
    ami = top.get("ami", str, DEFAULT_AMI)
    if ami is not None and not _AMI_RE.match(ami):
        p.error(f"ami: {ami!r} is neither an AMI id (ami-...) nor resolve:ssm:/parameter/name")
    bastion = top.get("bastion_security_group", str)
    if bastion is not None and not _SG_ID_RE.match(bastion):
        p.error(f"bastion_security_group: {bastion!r} is not a security group id like sg-12345678")
    claim_wait = top.get("claim_wait_seconds", int, 300)
    if claim_wait is not None and not 0 < claim_wait <= 3600:
        p.error(f"claim_wait_seconds: {claim_wait} must be between 1 and 3600")

    vpc_t = top.table("vpc")
    vpc_cidr = _network(vpc_t.get("cidr", str, required=True), "vpc.cidr", p)
    vpc_id = vpc_t.get("id", str)
    if vpc_id is not None and not _VPC_ID_RE.match(vpc_id):
        p.error(f"vpc.id: {vpc_id!r} is not a VPC id like vpc-0123456789abcdef0")
    vpc_t.finish()
    if vpc_cidr is not None and not 16 <= vpc_cidr.prefixlen <= 28:
        p.error(f"vpc.cidr: {vpc_cidr} must be between /16 and /28 (AWS VPC sizes)")

    # --- subnets (optional) ---------------------------------------------------------------------
    subnets: list[Subnet] = []
    raw_subnets = top.get("subnets", list, [])
    for i, item in enumerate(raw_subnets or []):
        key = f"subnets[{i}]"
        if not isinstance(item, dict):
            p.error(f"{key}: must be a table with az and cidr")
            continue
        t = _Table(item, key, p)
        az = t.get("az", str, required=True)
        cidr = _network(t.get("cidr", str, required=True), f"{key}.cidr", p)
        t.finish()
        if az is None or cidr is None:
            continue
        if region and not _in_region(az, region):
            p.error(f"{key}.az: {az!r} is not in region {region}")
        if vpc_cidr is not None and not cidr.subnet_of(vpc_cidr):
            p.error(f"{key}.cidr: {cidr} is not inside vpc.cidr {vpc_cidr}")
        if not 16 <= cidr.prefixlen <= 28:
            p.error(f"{key}.cidr: {cidr} must be between /16 and /28 (AWS subnet sizes)")
        for other in subnets:
            if other.cidr.overlaps(cidr):
                p.error(f"{key}.cidr: {cidr} overlaps subnet {other.cidr}")
        subnets.append(Subnet(az=az, cidr=cidr))
    explicit_subnets = bool(subnets)

    # --- slots ----------------------------------------------------------------------------------
    slots: list[Slot] = []
    raw_slots = top.get("slots", list, required=True)
    if raw_slots is not None and not raw_slots:
        p.error("slots: empty; declare at least one [[slots]] with number, az and ip")
    numbers: dict[int, str] = {}
    ips: dict[IPv4Address, str] = {}
    for i, item in enumerate(raw_slots or []):
        key = f"slots[{i}]"
        if not isinstance(item, dict):
            p.error(f"{key}: must be a table with number, az and ip")
            continue
        t = _Table(item, key, p)
        number = t.get("number", int, required=True)
        az = t.get("az", str, required=True)
        ip = _address(t.get("ip", str, required=True), f"{key}.ip", p)
        t.finish()
        if number is not None:
            # ZooKeeper's myid must be 1..255 (zookeeperAdmin: "myid ... between 1 and 255").
            if not 1 <= number <= 255:
                p.error(f"{key}.number: {number} must be 1-255 (it is the ZooKeeper myid)")
            if number in numbers:
                p.error(f"{key}.number: slot number {number} is also used by {numbers[number]}; make it unique")
            numbers.setdefault(number, key)
        if ip is not None:
            if ip in ips:
                p.error(f"{key}.ip: {ip} is also used by {ips[ip]}; every slot needs its own IP")
            ips.setdefault(ip, key)
        if az is not None and region and not _in_region(az, region):
            p.error(f"{key}.az: {az!r} is not in region {region}")
        if number is None or az is None or ip is None or vpc_cidr is None:
            continue
        if ip not in vpc_cidr:
            p.error(f"{key}.ip: {ip} is outside vpc.cidr {vpc_cidr}; pick an address inside the VPC")
            continue
        subnet: Subnet | None
        if explicit_subnets:
            subnet = next((s for s in subnets if ip in s.cidr), None)
            if subnet is None:
                p.error(f"{key}.ip: {ip} is in none of the [[subnets]]; add its subnet or fix the IP")
                continue
            if subnet.az != az:
                p.error(f"{key}.az: {az} but its IP {ip} is in subnet {subnet.cidr} of {subnet.az}; make them agree")
                continue
        else:
            cidr = IPv4Network(f"{ip}/{_subnet_prefix(vpc_cidr)}", strict=False)
            subnet = next((s for s in subnets if s.cidr == cidr), None)
            if subnet is None:
                subnet = Subnet(az=az, cidr=cidr)
                subnets.append(subnet)
            elif subnet.az != az:
                p.error(
                    f"{key}.az: {az}, but slot IP {ip} falls in derived subnet {cidr}, which another slot puts "
                    f"in {subnet.az}; list [[subnets]] explicitly or fix the IP"
                )
                continue
        if ip in reserved_addresses(subnet.cidr):
            p.error(
                f"{key}.ip: {ip} is one of the 5 addresses AWS reserves in subnet {subnet.cidr} "
                "(first four and last); pick another address"
            )
            continue
        slots.append(Slot(number=number, az=az, ip=ip, subnet=subnet))

    # --- ports ----------------------------------------------------------------------------------
    pt = top.table("ports")
    port_values = {
        "zookeeper_client": _check_port(pt.get("zookeeper_client", int, 2181), "ports.zookeeper_client", p),
        "zookeeper_quorum": _check_port(pt.get("zookeeper_quorum", int, 2888), "ports.zookeeper_quorum", p),
        "zookeeper_election": _check_port(pt.get("zookeeper_election", int, 3888), "ports.zookeeper_election", p),
        "kafka": _check_port(pt.get("kafka", int, 9095), "ports.kafka", p),
    }
    pt.finish()
    seen_ports: dict[int, str] = {}
    for pname, value in port_values.items():
        if value is None:
            continue
        if value == 22:
            p.error(f"ports.{pname}: 22 is SSH (opened only from the bastion group); pick another port")
        if value in seen_ports:
            p.error(f"ports.{pname}: {value} collides with ports.{seen_ports[value]}; every port must differ")
        seen_ports.setdefault(value, pname)
    ports = Ports(
        zk_client=port_values["zookeeper_client"] or 2181,
        zk_quorum=port_values["zookeeper_quorum"] or 2888,
        zk_election=port_values["zookeeper_election"] or 3888,
        kafka=port_values["kafka"] or 9095,
    )

    # --- asg ------------------------------------------------------------------------------------
    at = top.table("asg")
    asg_min = at.get("min", int, 2)
    asg_desired = at.get("desired", int, 3)
    asg_max = at.get("max", int, 4)
    at.finish()
    if asg_min is not None and asg_min < 0:
        p.error(f"asg.min: {asg_min} must be >= 0")
    if asg_min is not None and asg_desired is not None and asg_min > asg_desired:
        p.error(f"asg.min: {asg_min} is greater than asg.desired {asg_desired}; lower min or raise desired")
    if asg_desired is not None and asg_max is not None and asg_desired > asg_max:
        p.error(f"asg.desired: {asg_desired} is greater than asg.max {asg_max}; lower desired or raise max")
    if asg_max is not None and raw_slots and asg_max > len(raw_slots):
        p.warn(
            f"asg.max: {asg_max} is more than the {len(raw_slots)} slots; surplus instances find no free slot "
            "and stand by"
        )
    if raw_slots and len(raw_slots) % 2 == 0:
        p.warn(
            f"slots: {len(raw_slots)} ZooKeeper servers is an even number; it tolerates no more failures than "
            f"{len(raw_slots) - 1} (zookeeperAdmin: use an odd number)"
        )

    # --- volume ---------------------------------------------------------------------------------
    vt = top.table("volume")
    size = vt.get("size_gib", int, 20)
    vtype = vt.get("type", str, "gp3")
    encrypted = vt.get("encrypted", bool, True)
    vt.finish()
    if size is not None and not 1 <= size <= 16384:
        p.error(f"volume.size_gib: {size} must be 1-16384 (EBS limits)")
    if vtype is not None and vtype not in VOLUME_TYPES:
        p.error(f"volume.type: {vtype!r} is not an EBS volume type; use one of {', '.join(VOLUME_TYPES)}")

    # --- servers and their base configs ---------------------------------------------------------
    specs: dict[str, tuple[ServerSpec, Path] | None] = {}
    for server, default_config in (("zookeeper", "zookeeper.config"), ("kafka", "kafka.config")):
        st = top.table(server)
        version = st.get("version", str, required=True)
        archive = st.get("archive", str, required=True)
        config_name = st.get("config", str, default_config)
        source = st.get("source", str)
        st.finish()
        if version is not None and not re.match(r"^\d+\.\d+\.\d+$", version):
            p.error(f"{server}.version: {version!r} is not a version like 3.9.2")
        if archive is not None and (not archive or archive.startswith("/") or archive.endswith("/")):
            p.error(f"{server}.archive: {archive!r} is not an S3 object key like archives/name.tgz")
        if version is None or archive is None or config_name is None:
            specs[server] = None
            continue
        specs[server] = (ServerSpec(version=version, archive_key=archive, source=source), base_dir / config_name)

    tags_t = top.table("tags")
    tags: dict[str, str] = {}
    for tkey in list(tags_t.raw):
        tvalue = tags_t.get(tkey, str)
        if tkey.lower().startswith(("aws:", "kafka-asg:")):
            p.error(f"tags.{tkey}: the aws: and kafka-asg: prefixes are reserved; rename the tag")
        elif tvalue is not None:
            tags[tkey] = tvalue
    tags_t.finish()
    top.finish()

    zk = specs.get("zookeeper")
    kafka = specs.get("kafka")
    slot_tuple = tuple(sorted(slots, key=lambda s: s.number))
    if zk is not None:
        zk_props = _read_base_config(zk[1], "zookeeper.config", p)
        if zk_props is not None:
            _check_zookeeper_base(zk_props, "zookeeper.config", slot_tuple, ports, p)
    if kafka is not None:
        kafka_props = _read_base_config(kafka[1], "kafka.config", p)
        if kafka_props is not None:
            _check_kafka_base(kafka_props, "kafka.config", slot_tuple, ports, p)

    if p.errors:
        return None
    assert name and region and bucket and vpc_cidr and zk and kafka and instance_type and ami
    assert asg_min is not None and asg_desired is not None and asg_max is not None
    return ClusterConfig(
        name=name,
        region=region,
        mode=cast(Mode, mode),
        vpc_cidr=vpc_cidr,
        vpc_id=vpc_id,
        subnets=tuple(s for s in subnets if any(slot.subnet == s for slot in slot_tuple)),
        slots=slot_tuple,
        ports=ports,
        bucket=bucket,
        zookeeper_config=zk[1],
        kafka_config=kafka[1],
        zookeeper=zk[0],
        kafka=kafka[0],
        volumes=cast(VolumeMode, volumes),
        volume=VolumeSpec(size_gib=size or 20, volume_type=vtype or "gp3", encrypted=bool(encrypted)),
        instance_type=instance_type,
        ami=ami,
        asg=AsgSize(min=asg_min, desired=asg_desired, max=asg_max),
        bastion_security_group=bastion,
        tags=tags,
        claim_wait_seconds=claim_wait or 300,
    )


def _check_file(path: Path) -> tuple[ClusterConfig | None, _Problems]:
    import tomllib  # here: the node agent reads cluster.json, never TOML, and imports this module at every start

    p = _Problems()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        p.error(f"{path}: no such config file; create one with `kafka-asg init {path}`")
        return None, p
    except (OSError, UnicodeDecodeError) as exc:
        p.error(f"{path}: cannot read it ({exc})")
        return None, p
    except tomllib.TOMLDecodeError as exc:
        p.error(f"{path}: not valid TOML ({exc}); fix the syntax")
        return None, p
    return _parse(raw, path.parent, p), p


def validate_file(path: Path) -> tuple[list[str], list[str]]:
    """Check ``path`` offline: (errors, warnings). Makes no AWS call."""
    _, p = _check_file(path)
    return p.errors, p.warnings


def load_config(path: Path | None, *, local: bool = False) -> ClusterConfig:
    """Load and validate the cluster config; raise :class:`ConfigError` listing every problem.

    ``None`` means ``./cluster.toml``; with ``local`` and no such file, the packaged seed example.
    """
    if path is None:
        path = DEFAULT_CONFIG_PATH
        if local and not path.exists():
            logger.info("no %s: using the seed example (kafka-asg init writes it)", path)
            path = SEED_DIR / "cluster.toml"
    cfg, p = _check_file(path)
    for warning in p.warnings:
        logger.warning("%s: %s", path, warning)
    if cfg is None:
        raise ConfigError(p.errors)
    return cfg


def seed_config() -> ClusterConfig:
    """The seed post's cluster, from the packaged example."""
    return load_config(SEED_DIR / "cluster.toml")


# ============================================================================ JSON document for the agent


def config_to_document(cfg: ClusterConfig) -> dict[str, Any]:
    """The config as JSON-able data (uploaded as ``cluster.json``); the base config files go separately."""
    return {
        "version": DOCUMENT_VERSION,
        "name": cfg.name,
        "region": cfg.region,
        "mode": cfg.mode,
        "vpc": {"cidr": str(cfg.vpc_cidr), "id": cfg.vpc_id},
        "subnets": [{"az": s.az, "cidr": str(s.cidr)} for s in cfg.subnets],
        "slots": [{"number": s.number, "az": s.az, "ip": str(s.ip), "subnet": str(s.subnet.cidr)} for s in cfg.slots],
        "ports": asdict(cfg.ports),
        "bucket": cfg.bucket,
        "zookeeper": asdict(cfg.zookeeper),
        "kafka": asdict(cfg.kafka),
        "volumes": cfg.volumes,
        "volume": asdict(cfg.volume),
        "instance_type": cfg.instance_type,
        "ami": cfg.ami,
        "asg": asdict(cfg.asg),
        "bastion_security_group": cfg.bastion_security_group,
        "tags": dict(cfg.tags),
        "claim_wait_seconds": cfg.claim_wait_seconds,
    }


def config_from_document(doc: Mapping[str, Any], zookeeper_config: Path, kafka_config: Path) -> ClusterConfig:
    """Inverse of :func:`config_to_document`; the base config paths are where the caller put the files."""
    if doc.get("version") != DOCUMENT_VERSION:
        raise ConfigError(
            [f"cluster.json: version {doc.get('version')!r} is not {DOCUMENT_VERSION}; upgrade kafka-asg"]
        )
    try:
        subnets = {s["cidr"]: Subnet(az=s["az"], cidr=IPv4Network(s["cidr"])) for s in doc["subnets"]}
        return ClusterConfig(
            name=doc["name"],
            region=doc["region"],
            mode=doc["mode"],
            vpc_cidr=IPv4Network(doc["vpc"]["cidr"]),
            vpc_id=doc["vpc"]["id"],
            subnets=tuple(subnets.values()),
            slots=tuple(
                Slot(number=s["number"], az=s["az"], ip=IPv4Address(s["ip"]), subnet=subnets[s["subnet"]])
                for s in doc["slots"]
            ),
            ports=Ports(**doc["ports"]),
            bucket=doc["bucket"],
            zookeeper_config=zookeeper_config,
            kafka_config=kafka_config,
            zookeeper=ServerSpec(**doc["zookeeper"]),
            kafka=ServerSpec(**doc["kafka"]),
            volumes=doc["volumes"],
            volume=VolumeSpec(**doc["volume"]),
            instance_type=doc["instance_type"],
            ami=doc["ami"],
            asg=AsgSize(**doc["asg"]),
            bastion_security_group=doc["bastion_security_group"],
            tags=dict(doc["tags"]),
            claim_wait_seconds=doc["claim_wait_seconds"],
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError([f"cluster.json: malformed document ({exc!r}); re-run `kafka-asg up`"]) from exc
