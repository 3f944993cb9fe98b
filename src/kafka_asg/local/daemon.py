"""The local region daemon: moto (strict) served to the operator and to instances, IMDS, and the reconcile
loop that makes the API's state real through a :class:`HostMachinery`.

One process (``kafka-asg local serve``). At start it creates "the account's network" for the cluster
(VPC + one subnet per configured AZ in moto, the VPC namespace and the bastion on this machine), then every
``loop_interval`` seconds, and at once after an AttachNetworkInterface or AttachVolume, it

1. advances strict moto's clocks (pending -> running, terminations, the Auto Scaling groups), and
2. observes the API (:func:`observe`), compares with what exists on the machine and applies the difference
   (:func:`plan` is pure; :meth:`RegionDaemon.apply` executes it).

Only instances in the rehearsal VPC's subnets become hosts: anything else (moto's default VPC) stays an
API record, so no address outside our namespaces is ever configured.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from kafka_asg.agent.concurrency import lower_thread_priority
from kafka_asg.config import CLUSTER_TAG, ClusterConfig, Subnet
from kafka_asg.errors import ConfigError, HostError, KafkaAsgError
from kafka_asg.fsutil import atomic_write
from kafka_asg.local.hostapi import (
    IMDS_ADDRESS,
    HostMachinery,
    InstanceSpec,
    NicSpec,
    VolumeSpec,
    VpcSpec,
)
from kafka_asg.local.imds import ImdsNic, ImdsServer, ImdsService, ImdsView
from kafka_asg.local.strict import DEFAULT_ACCOUNT, StrictMoto, StrictOptions
from kafka_asg.paths import RegionPaths

logger = logging.getLogger(__name__)

DEFAULT_PORT = 4566
ADMIN_PREFIX = "/_kafka_asg/"
SPEC_FILE = "spec.json"
_IMAGE_SUFFIX = ".img"


# A reconcile woken by an attach waits until no API call is in flight and none began for SETTLE_QUIET_SECONDS, for at
# most SETTLE_SECONDS (RegionDaemon._settle).
SETTLE_SECONDS = 0.03
SETTLE_QUIET_SECONDS = 0.004


def local_port() -> int:
    return int(os.environ.get("KAFKA_ASG_LOCAL_PORT", str(DEFAULT_PORT)))


# ------------------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class RegionSpec:
    """What the daemon needs from the cluster config, written to ``<state>/spec.json`` by ``local start``."""

    name: str
    region: str
    vpc_cidr: IPv4Network
    subnets: tuple[Subnet, ...]
    port: int = DEFAULT_PORT
    options: StrictOptions = field(default_factory=StrictOptions)
    loop_interval: float = 0.4

    @classmethod
    def from_config(
        cls, cfg: ClusterConfig, port: int | None = None, options: StrictOptions | None = None
    ) -> RegionSpec:
        return cls(
            name=cfg.name,
            region=cfg.region,
            vpc_cidr=cfg.vpc_cidr,
            subnets=cfg.subnets,
            port=local_port() if port is None else port,
            options=options or StrictOptions(),
        )

    @property
    def bastion_name(self) -> str:
        return f"{self.name}-bastion"

    @property
    def vpc(self) -> VpcSpec:
        return VpcSpec(cidr=self.vpc_cidr, subnets=tuple(s.cidr for s in self.subnets))

    def to_json(self) -> str:
        return json.dumps(
            {
                "name": self.name,
                "region": self.region,
                "vpc_cidr": str(self.vpc_cidr),
                "subnets": [{"az": s.az, "cidr": str(s.cidr)} for s in self.subnets],
                "port": self.port,
                "options": asdict(self.options),
                "loop_interval": self.loop_interval,
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str) -> RegionSpec:
        doc = json.loads(text)
        return cls(
            name=doc["name"],
            region=doc["region"],
            vpc_cidr=IPv4Network(doc["vpc_cidr"]),
            subnets=tuple(Subnet(az=s["az"], cidr=IPv4Network(s["cidr"])) for s in doc["subnets"]),
            port=int(doc["port"]),
            options=StrictOptions(**doc.get("options", {})),
            loop_interval=float(doc.get("loop_interval", 0.4)),
        )


def bastion_address(vpc_cidr: IPv4Network, subnets: Iterable[IPv4Network]) -> tuple[IPv4Address, IPv4Network]:
    """The bastion's address: the first VPC address after the VPC's reserved base..base+3 that lies outside
    every subnet, with the largest /28-or-smaller block around it that overlaps no subnet (seed: 10.0.0.4 in
    10.0.0.0/28)."""
    taken = list(subnets)
    base = vpc_cidr.network_address
    for offset in range(4, vpc_cidr.num_addresses - 1):
        ip = base + offset
        if any(ip in s for s in taken):
            continue
        for prefix in range(max(28, vpc_cidr.prefixlen), 33):
            block = IPv4Network(f"{ip}/{prefix}", strict=False)
            if not any(block.overlaps(s) for s in taken):
                return ip, block
    raise ConfigError([f"vpc {vpc_cidr}: no address outside the subnets is left for the bastion; shrink a subnet"])


# ------------------------------------------------------------------------------ observed state


@dataclass(frozen=True)
class ObservedInstance:
    spec: InstanceSpec
    state: str
    user_data: bytes | None
    az: str


@dataclass(frozen=True)
class Observed:
    """One snapshot of the API, as far as the machine is concerned."""

    instances: tuple[ObservedInstance, ...] = ()
    nics: frozenset[tuple[str, NicSpec]] = frozenset()  # (instance id, secondary NIC)
    volumes: frozenset[tuple[str, VolumeSpec]] = frozenset()  # (instance id, attached data volume)
    all_volumes: frozenset[VolumeSpec] = frozenset()  # every data volume (for its image file)

    def running(self) -> dict[str, ObservedInstance]:
        return {i.spec.instance_id: i for i in self.instances if i.state == "running"}


@dataclass(frozen=True)
class Applied:
    """What exists on the machine (as far as the daemon made it)."""

    hosts: frozenset[str] = frozenset()
    user_data_ran: frozenset[str] = frozenset()
    nics: frozenset[tuple[str, str]] = frozenset()  # (instance id, eni id)
    volumes: frozenset[tuple[str, str]] = frozenset()  # (instance id, volume id)


@dataclass(frozen=True)
class Step:
    """One change to the machine. ``kind``: destroy | unplug | detach | create | user-data | plug | attach."""

    kind: str
    instance_id: str
    instance: InstanceSpec | None = None
    nic: NicSpec | None = None
    volume: VolumeSpec | None = None
    eni_id: str | None = None
    volume_id: str | None = None
    script: bytes | None = None

    def describe(self) -> str:
        what = self.eni_id or self.volume_id or (self.nic.eni_id if self.nic else None)
        what = what or (self.volume.volume_id if self.volume else None)
        return f"{self.kind} {self.instance_id}" + (f" {what}" if what else "")


def plan(observed: Observed, applied: Applied) -> list[Step]:
    """The steps that make the machine match the API. Removals first (a volume must leave its old instance
    before it can appear in the next one), then creations."""
    running = observed.running()
    steps: list[Step] = []
    for instance_id in sorted(applied.hosts - set(running)):
        # Not running (shutting-down, terminated, stopped, or unknown): a power cut.
        steps.append(Step("destroy", instance_id))
    gone = applied.hosts - set(running)
    want_nics = {(iid, nic.eni_id) for iid, nic in observed.nics if iid in running}
    for iid, eni_id in sorted(applied.nics - want_nics):
        if iid not in gone:
            steps.append(Step("unplug", iid, eni_id=eni_id))
    want_vols = {(iid, vol.volume_id) for iid, vol in observed.volumes if iid in running}
    for iid, vol_id in sorted(applied.volumes - want_vols):
        # Also for destroyed instances: their loop device must be released before the volume moves on.
        steps.append(Step("detach", iid, volume_id=vol_id))
    for iid, inst in sorted(running.items()):
        if iid not in applied.hosts:
            steps.append(Step("create", iid, instance=inst.spec))
        if iid not in applied.user_data_ran and inst.user_data:
            steps.append(Step("user-data", iid, script=inst.user_data))
    for iid, nic in sorted(observed.nics, key=lambda p: (p[0], p[1].eni_id)):
        if iid in running and (iid, nic.eni_id) not in applied.nics:
            steps.append(Step("plug", iid, nic=nic))
    for iid, vol in sorted(observed.volumes, key=lambda p: (p[0], p[1].volume_id)):
        if iid in running and (iid, vol.volume_id) not in applied.volumes:
            steps.append(Step("attach", iid, volume=vol))
    return steps


def batched(steps: Iterable[Step]) -> list[tuple[Step, ...]]:
    """The plan's steps in order, the attaches to one instance together: an agent attaches its slot's volumes at
    once, and the host shows them in one go (one loop listing, one process in the instance)."""
    out: list[tuple[Step, ...]] = []
    for step in steps:
        last = out[-1] if out else ()
        if step.kind == "attach" and last and last[0].kind == "attach" and last[0].instance_id == step.instance_id:
            out[-1] = (*last, step)
        else:
            out.append((step,))
    return out


def decode_user_data(raw: Any) -> bytes | None:
    """moto keeps user data base64-encoded (its ``Base64EncodedString``, or a plain str)."""
    if not raw:
        return None
    encoded = raw.as_bytes() if hasattr(raw, "as_bytes") else str(raw).encode()
    try:
        return base64.b64decode(encoded, validate=False)
    except ValueError:
        return encoded


def _is_root_device(instance: Any, device: str) -> bool:
    return device in (instance.root_device_name, "/dev/sda1", "/dev/xvda")


def observe(ec2: Any, spec: RegionSpec, volumes_dir: Path) -> Observed:
    """Read moto's EC2 backend (caller holds the strict lock) into an :class:`Observed`."""
    ours = {str(s.cidr): s for s in spec.subnets}
    instances: list[ObservedInstance] = []
    nics: set[tuple[str, NicSpec]] = set()
    attached: set[tuple[str, VolumeSpec]] = set()
    for instance in ec2.all_instances():
        primary = instance.nics.get(0)
        if primary is None or primary.subnet is None or primary.subnet.cidr_block not in ours:
            continue
        subnet = IPv4Network(primary.subnet.cidr_block)
        ispec = InstanceSpec(
            instance_id=instance.id,
            primary_ip=IPv4Address(primary.private_ip_address),
            mac=primary.mac_address,
            subnet=subnet,
        )
        instances.append(
            ObservedInstance(ispec, instance.state, decode_user_data(instance.user_data), instance.availability_zone)
        )
        for index, eni in instance.nics.items():
            if index >= 1:
                ip = IPv4Address(eni.private_ip_address) if eni.private_ip_address else None
                nics.add((instance.id, NicSpec(eni_id=eni.id, mac=eni.mac_address, device_index=index, ip=ip)))
    all_volumes: set[VolumeSpec] = set()
    for volume in ec2.volumes.values():
        attachment = volume.attachment
        if attachment is not None and _is_root_device(attachment.instance, attachment.device):
            continue  # the root volume is the instance's overlay root, not a block device
        vspec = VolumeSpec(
            volume_id=volume.id, image=volumes_dir / f"{volume.id}{_IMAGE_SUFFIX}", size_gib=int(volume.size)
        )
        all_volumes.add(vspec)
        if attachment is not None:
            attached.add((attachment.instance.id, vspec))
    return Observed(tuple(instances), frozenset(nics), frozenset(attached), frozenset(all_volumes))


def _zone_id(ec2: Any, az: str) -> str:
    zones = ec2.describe_availability_zones(zone_names=[az])
    return str(zones[0].zone_id) if zones else az


def _role_of(instance: Any, iam: Any) -> str | None:
    profile = instance.iam_instance_profile
    if not profile or iam is None:
        return None
    try:
        if profile.get("Arn"):
            found = iam.get_instance_profile_by_arn(profile["Arn"])
        else:
            found = iam.get_instance_profile(profile.get("Name", ""))
    except Exception:  # moto raises its own NotFound types; no profile means no credentials, as on AWS
        return None
    roles = list(found.roles)
    return str(roles[0].name) if roles else None


def imds_view(ec2: Any, iam: Any, instance: Any, region: str) -> ImdsView:
    nics = []
    for index, eni in sorted(instance.nics.items()):
        if eni.subnet is None:
            continue
        ips = [IPv4Address(eni.private_ip_address)] + [
            IPv4Address(a["PrivateIpAddress"])
            for a in (eni.private_ip_addresses or [])
            if isinstance(a, dict) and a.get("PrivateIpAddress") and a["PrivateIpAddress"] != eni.private_ip_address
        ]
        nics.append(
            ImdsNic(
                mac=eni.mac_address,
                device_number=index,
                interface_id=eni.id,
                subnet_id=eni.subnet.id,
                vpc_id=eni.subnet.vpc_id,
                subnet_cidr=IPv4Network(eni.subnet.cidr_block),
                local_ipv4s=tuple(ips),
            )
        )
    in_group = getattr(instance, "autoscaling_group", None) is not None
    return ImdsView(
        instance_id=instance.id,
        region=region,
        az=instance.availability_zone,
        az_id=_zone_id(ec2, instance.availability_zone),
        local_ipv4=IPv4Address(instance.private_ip),
        nics=tuple(nics),
        tokens_required=instance.metadata_options.http_tokens == "required",
        role=_role_of(instance, iam),
        user_data=decode_user_data(instance.user_data),
        lifecycle_state="InService" if in_group else None,
    )


# ------------------------------------------------------------------------------------- the daemon


@dataclass
class RegionDaemon:
    spec: RegionSpec
    paths: RegionPaths
    hosts: HostMachinery
    strict: StrictMoto = field(init=False)
    account_id: str = DEFAULT_ACCOUNT
    _applied_user_data: set[str] = field(default_factory=set)
    _applied_nics: set[tuple[str, str]] = field(default_factory=set)
    _applied_volumes: set[tuple[str, str]] = field(default_factory=set)
    _partitioned: set[str] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)
    _wake: threading.Event = field(default_factory=threading.Event)  # set by an attach, and by stop()
    _servers: list[Any] = field(default_factory=list)
    _failures: dict[str, int] = field(default_factory=dict)
    _imaged: frozenset[VolumeSpec] | None = None  # the volumes _sync_images last made images for
    _api_calls: int = 0  # EC2 / Auto Scaling requests being served or waiting for the lock
    _api_call_began: float = 0.0  # time.monotonic() of the latest one's arrival
    _imds_views: dict[IPv4Address, ImdsView | None] = field(default_factory=dict)  # imds_source's, under the lock
    _api_calls_changed: threading.Condition = field(default_factory=threading.Condition)

    def __post_init__(self) -> None:
        self.strict = StrictMoto(self.spec.options, account_id=self.account_id)
        self.strict.on_attach = self._wake.set

    # -- moto ----------------------------------------------------------------------------------
    @property
    def ec2(self) -> Any:
        from moto.ec2.models import ec2_backends

        return ec2_backends[self.account_id][self.spec.region]

    @property
    def iam(self) -> Any:
        from moto.iam.models import iam_backends

        return iam_backends[self.account_id]["global"]

    def create_network(self) -> str:
        """The VPC and its subnets in the API (the account's network the provisioner finds by CIDR)."""
        tags = {CLUSTER_TAG: self.spec.name, "Name": f"{self.spec.name}-vpc"}
        with self.strict.lock:
            ec2 = self.ec2
            vpc = ec2.create_vpc(
                cidr_block=str(self.spec.vpc_cidr), tags=[{"Key": k, "Value": v} for k, v in tags.items()]
            )
            for subnet in self.spec.subnets:
                ec2.create_subnet(
                    vpc_id=vpc.id,
                    cidr_block=str(subnet.cidr),
                    availability_zone=subnet.az,
                    tags={"subnet": {CLUSTER_TAG: self.spec.name, "Name": f"{self.spec.name}-{subnet.az}"}},
                )
        logger.info("network: %s %s with %d subnets", vpc.id, self.spec.vpc_cidr, len(self.spec.subnets))
        return str(vpc.id)

    def imds_source(self, address: IPv4Address) -> ImdsView | None:
        """What IMDS shows the instance at ``address``. Kept until the next API call or tick (the only things that
        change it): an agent reads its identity as nine requests side by side, each of which looked it up anew."""
        with self.strict.lock:
            if address not in self._imds_views:
                self._imds_views[address] = self._find_imds_view(address)
            return self._imds_views[address]

    def _find_imds_view(self, address: IPv4Address) -> ImdsView | None:
        for instance in self.ec2.all_instances():
            if instance.state not in ("pending", "running"):
                continue
            for eni in instance.nics.values():
                if eni.private_ip_address and IPv4Address(eni.private_ip_address) == address:
                    return imds_view(self.ec2, self.iam, instance, self.spec.region)
        return None

    # -- the loop --------------------------------------------------------------------------------
    def applied(self) -> Applied:
        live = frozenset(self.hosts.live_instances())
        return Applied(
            hosts=live,
            user_data_ran=frozenset(self._applied_user_data),
            nics=frozenset(self._applied_nics),
            volumes=frozenset(self._applied_volumes),
        )

    def reconcile_once(self) -> list[str]:
        """Tick strict moto, then make the machine match the API. Returns what was done, one line per step."""
        # One turn of the lock for both: each turn waits behind the API requests in flight (30-50 ms of a boot).
        with self.strict.lock:
            self.strict.tick([self.spec.region])
            self._imds_views.clear()
            observed = observe(self.ec2, self.spec, self.paths.volumes_dir)
        self._sync_images(observed.all_volumes)
        done = []
        for steps in batched(plan(observed, self.applied())):
            try:
                self.apply(*steps)
                for step in steps:
                    done.append(step.describe())
                    self._failures.pop(step.describe(), None)
            except HostError as exc:
                # Retried next cycle (the plan is recomputed); logged loudly only the first few times.
                for step in steps:
                    count = self._failures[step.describe()] = self._failures.get(step.describe(), 0) + 1
                    if count <= 3:
                        logger.error("%s failed (try %d, retried every cycle): %s", step.describe(), count, exc)
        self._enforce_az_down(observed)
        return done

    def apply(self, step: Step, *more: Step) -> None:
        """One step, or several attaches to one instance (see :func:`batched`)."""
        iid = step.instance_id
        assert all(s.kind == "attach" == step.kind and s.instance_id == iid for s in more), (step, more)
        if step.kind == "destroy":
            self.hosts.destroy_instance(iid)
            # _applied_user_data keeps the id: user data runs once per instance (cloud-init's per-instance).
            self._applied_nics = {p for p in self._applied_nics if p[0] != iid}
            self._partitioned.discard(iid)
        elif step.kind == "unplug" and step.eni_id:
            self.hosts.unplug_nic(iid, step.eni_id)
            self._applied_nics.discard((iid, step.eni_id))
        elif step.kind == "detach" and step.volume_id:
            self.hosts.detach_volume(iid, step.volume_id)
            self._applied_volumes.discard((iid, step.volume_id))
        elif step.kind == "create" and step.instance:
            self.hosts.create_instance(step.instance)
        elif step.kind == "user-data" and step.script is not None:
            # Like cloud-init: once per instance; only AWS_ENDPOINT_URL differs from AWS.
            env = {"AWS_ENDPOINT_URL": self.instance_endpoint_url}
            self.hosts.run_user_data(iid, step.script, env)
            self._applied_user_data.add(iid)
            logger.info("%s: user data started", iid)
        elif step.kind == "plug" and step.nic:
            self.hosts.plug_nic(iid, step.nic)
            self._applied_nics.add((iid, step.nic.eni_id))
        elif step.kind == "attach":
            volumes = [s.volume for s in (step, *more) if s.volume is not None]
            self.hosts.attach_volumes(iid, volumes)
            self._applied_volumes.update((iid, v.volume_id) for v in volumes)

    def _sync_images(self, volumes: frozenset[VolumeSpec]) -> None:
        """One sparse image per EBS volume, created with the volume's size; removed with the volume. Done again
        only when the volumes change (or an image stayed behind on a loop device): listing them took 10 ms of
        every reconcile."""
        if volumes == self._imaged:
            return
        self.paths.volumes_dir.mkdir(parents=True, exist_ok=True)
        wanted = set()
        for vol in volumes:
            wanted.add(vol.image.name)
            if not vol.image.exists():
                with open(vol.image, "wb") as fh:
                    fh.truncate(vol.size_gib * 1024**3)
        busy = {v for _, v in self._applied_volumes}
        kept = False
        for image in self.paths.volumes_dir.glob(f"vol-*{_IMAGE_SUFFIX}"):
            if image.name not in wanted:
                if image.stem in busy:
                    kept = True
                else:
                    image.unlink(missing_ok=True)
        self._imaged = None if kept else volumes

    # -- faults ----------------------------------------------------------------------------------
    def _enforce_az_down(self, observed: Observed) -> None:
        if not self.strict.down_azs:
            return
        live = self.hosts.live_instances()
        for inst in observed.instances:
            iid = inst.spec.instance_id
            if inst.az in self.strict.down_azs and iid not in self._partitioned and iid in live:
                self.hosts.partition(iid)
                self._partitioned.add(iid)

    def fault(self, action: str, target: str) -> str:
        """pause | resume | partition | heal an instance id; az-down | az-up an AZ."""
        if action in ("az-down", "az-up"):
            if target not in {s.az for s in self.spec.subnets}:
                raise ConfigError([f"{target} is not an AZ of this region's subnets"])
            with self.strict.lock:
                members = [i for i in self.ec2.all_instances() if i.availability_zone == target]
            live = self.hosts.live_instances()
            if action == "az-down":
                self.strict.down_azs.add(target)
                for inst in members:
                    if inst.id in live:
                        self.hosts.partition(inst.id)
                        self._partitioned.add(inst.id)
            else:
                self.strict.down_azs.discard(target)
                for inst in members:
                    if inst.id in live and inst.id in self._partitioned:
                        self.hosts.heal(inst.id)
                        self._partitioned.discard(inst.id)
            return f"{action} {target}"
        if target not in self.hosts.live_instances():
            raise ConfigError([f"{target} is not a running instance of the local region"])
        call: Mapping[str, Callable[[str], None]] = {
            "pause": self.hosts.pause,
            "resume": self.hosts.resume,
            "partition": self.hosts.partition,
            "heal": self.hosts.heal,
        }
        if action not in call:
            raise ConfigError([f"unknown fault {action!r}"])
        call[action](target)
        if action == "partition":
            self._partitioned.add(target)
        elif action == "heal":
            self._partitioned.discard(target)
        return f"{action} {target}"

    # -- serving ----------------------------------------------------------------------------------
    @property
    def instance_endpoint_url(self) -> str:
        return f"http://{self.spec.vpc.gateway}:{self.spec.port}"

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.spec.port}"

    def wsgi_app(self, admin: bool) -> Callable[..., Any]:
        moto_app = _dispatcher()
        lock = self.strict.lock

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
            path = str(environ.get("PATH_INFO", ""))
            if admin and path.startswith(ADMIN_PREFIX):
                return self._admin(environ, start_response)
            if signed_for(environ) == "s3":
                # S3 is neither ticked nor observed by the reconcile loop, so the strict lock has nothing to keep
                # consistent there (moto locks each object's bytes itself); under it, one instance fetching
                # Kafka's 59 MB archive held up every EC2 call of its own boot for the length of the GetObject.
                return _in_background(moto_app, environ, start_response)
            with self._api_calls_changed:
                self._api_calls += 1
                self._api_call_began = time.monotonic()
            try:
                with lock:
                    self._imds_views.clear()  # the call may change what IMDS shows
                    # moto computes the whole response inside the call; the lock keeps ticks out of it.
                    return list(moto_app(environ, start_response))
            finally:
                with self._api_calls_changed:
                    self._api_calls -= 1
                    self._api_calls_changed.notify_all()

        return app

    def _admin(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
            doc = json.loads(environ["wsgi.input"].read(length) or b"{}")
            message = self.fault(str(doc.get("action")), str(doc.get("target")))
            status, body = "200 OK", {"ok": True, "message": message}
        except KafkaAsgError as exc:
            text = "; ".join(exc.problems) if isinstance(exc, ConfigError) else str(exc)
            status, body = "400 Bad Request", {"ok": False, "message": text}
        raw = json.dumps(body).encode()
        start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(raw)))])
        return [raw]

    def start(self) -> None:
        """Create the network, start serving; returns once every server listens."""
        from werkzeug.serving import make_server

        self.strict.install()
        self.paths.root.mkdir(parents=True, exist_ok=True)
        self.create_network()
        self.hosts.create_vpc(self.spec.vpc)
        bastion_ip, bastion_net = bastion_address(self.spec.vpc_cidr, self.spec.vpc.subnets)
        self.hosts.create_bastion(self.spec.bastion_name, bastion_ip, bastion_net)
        operator = make_server("127.0.0.1", self.spec.port, self.wsgi_app(admin=True), threaded=True)
        vpc_sock = self.hosts.listen_in_vpc(self.spec.vpc.gateway, self.spec.port)
        for_instances = make_server(
            str(self.spec.vpc.gateway), self.spec.port, self.wsgi_app(admin=False), threaded=True, fd=vpc_sock.fileno()
        )
        imds = ImdsServer(self.hosts.listen_in_vpc(IMDS_ADDRESS, 80), ImdsService(self.imds_source))
        imds.start()
        self._servers = [operator, for_instances, imds]
        for server in (operator, for_instances):
            threading.Thread(target=server.serve_forever, name="moto-server", daemon=True).start()
        atomic_write(
            self.paths.endpoint_file,
            json.dumps(
                {
                    "endpoint_url": self.endpoint_url,
                    "instance_endpoint_url": self.instance_endpoint_url,
                    "region": self.spec.region,
                    "pid": os.getpid(),
                    "bastion": self.spec.bastion_name,
                },
                indent=2,
            ),
        )
        logger.info(
            "local region %s serves on %s (instances: %s)",
            self.spec.region,
            self.endpoint_url,
            self.instance_endpoint_url,
        )

    def run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                for line in self.reconcile_once():
                    logger.info("reconcile: %s", line)
            except Exception:
                logger.exception("reconcile cycle failed; please report it as a BUG")
            if self._wake.wait(max(0.0, self.spec.loop_interval - (time.monotonic() - started))):
                self._settle()
            self._wake.clear()

    def _settle(self) -> None:
        """Woken by an attach: let the API calls in flight go first, and those that follow within a few ms (for at
        most ``SETTLE_SECONDS``). A booting instance sends its slot's three AttachVolume calls and its scale-in
        protection side by side, and they arrive over 5-10 ms (threads, connections); a reconcile between them took
        the lock for its tick and observation from the ones still waiting, and plugged the volumes in two batches
        (each one loop table read and one process in the instance) instead of one."""
        deadline = time.monotonic() + SETTLE_SECONDS
        with self._api_calls_changed:
            while (now := time.monotonic()) < deadline:
                quiet_for = now - self._api_call_began
                if self._api_calls == 0 and quiet_for >= SETTLE_QUIET_SECONDS:
                    return
                self._api_calls_changed.wait(min(deadline - now, max(SETTLE_QUIET_SECONDS - quiet_for, 0.001)))

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def close(self) -> None:
        for server in self._servers:
            try:
                if isinstance(server, ImdsServer):
                    server.stop()
                else:
                    server.shutdown()
                    server.server_close()
            except Exception:
                logger.exception("stopping a server failed")
        self._servers.clear()
        self.strict.uninstall()


def serve(spec: RegionSpec, paths: RegionPaths, hosts: HostMachinery) -> int:
    """The foreground daemon: clean up leftovers of a crashed run, serve until SIGTERM/SIGINT, tear down."""
    daemon = RegionDaemon(spec, paths, hosts)

    def on_signal(signum: int, _frame: object) -> None:
        logger.info("signal %d: stopping the local region", signum)
        daemon.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    hosts.teardown()  # leftovers of a crashed daemon: its API state died with it
    try:
        daemon.start()
        atomic_write(paths.pid_file, f"{os.getpid()}\n")
        daemon.run()
    finally:
        paths.endpoint_file.unlink(missing_ok=True)
        daemon.close()
        hosts.teardown()
        logger.info("local region stopped; machine cleaned up")
    return 0


def memory_rss_kib(pid: int | None = None) -> int:
    """VmRSS of a process (this one by default), for the benchmark and ``local status``."""
    status = Path(f"/proc/{pid or os.getpid()}/status").read_text()
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


__all__: Sequence[str] = (
    "Applied",
    "Observed",
    "RegionDaemon",
    "RegionSpec",
    "Step",
    "bastion_address",
    "observe",
    "plan",
    "serve",
)


_CREDENTIAL_SCOPE = re.compile(r"Credential=[^/,\s]+/\d{8}/[^/,\s]+/([^/,\s]+)/aws4_request")


def _dispatcher() -> Any:
    """moto's WSGI dispatcher, finding each signed service's app once: moto finds it anew for every request (it
    lists its own package directory and tries every service's URL patterns: a few ms of CPU per request, under a
    lock every request waits on, while the instances of a boot call the API)."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

    class Dispatcher(DomainDispatcherApplication):
        def __init__(self) -> None:
            super().__init__(create_backend_app)
            self.by_service: dict[str, Any] = {}

        def get_application(self, environ: dict[str, Any]) -> Any:
            service = signed_for(environ)
            path = str(environ.get("PATH_INFO", ""))
            if service is None or path.startswith(("/moto-api", "/latest/")):  # moto's own special paths
                return super().get_application(environ)
            app = self.by_service.get(service)
            if app is None:
                app = self.by_service[service] = super().get_application(environ)
            return app

    return Dispatcher()


def _in_background(app: Callable[..., Any], environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
    """Serve a request, and write its answer, at a background thread priority: AWS serves S3 from machines of its
    own, this region from the cores the instances run on, where a 59 MB archive took CPU from a starting JVM."""
    lower_thread_priority()
    try:
        yield from list(app(environ, start_response))
    finally:
        lower_thread_priority(0)  # the server's thread may serve the next request on this connection


def signed_for(environ: Mapping[str, Any]) -> str | None:
    """The service a request's SigV4 ``Authorization`` header is scoped to (``.../<region>/<service>/aws4_request``;
    https://docs.aws.amazon.com/IAM/latest/UserGuide/reference_sigv-signing-elements.html), None when unsigned."""
    found = _CREDENTIAL_SCOPE.search(str(environ.get("HTTP_AUTHORIZATION", "")))
    return found.group(1) if found else None
