"""moto made strict where it is looser than AWS, in the places this system depends on.

Every piece here is a small patch of moto's in-process backends (moto pinned in requirements.lock), pinned
by a test in ``tests/unit/test_strict.py`` that fails on plain moto, and listed with the AWS documentation it
follows in ``docs/rehearsal-fidelity.md``. Time-based behaviour (pending -> running, shutting-down ->
terminated with its detaches, the Auto Scaling group's replacements) advances in :meth:`StrictMoto.tick`,
which the region daemon calls from its reconcile loop; tests call it with their own clock.

moto's backends are not thread safe; :attr:`StrictMoto.lock` is held by the daemon around every API request
and every tick, so a tick never sees half a request.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import moto.core.responses as moto_responses
from moto.autoscaling.models import AutoScalingBackend, FakeAutoScalingGroup, autoscaling_backends
from moto.core.utils import method_names_from_class
from moto.ec2.exceptions import EC2ClientError
from moto.ec2.models import EC2Backend, ec2_backends
from moto.ec2.models.elastic_network_interfaces import Attachment, NetworkInterface
from moto.ec2.models.instances import Instance
from moto.ec2.models.launch_templates import LaunchTemplate
from moto.ec2.models.subnets import Subnet
from moto.ec2.utils import parse_user_data

logger = logging.getLogger(__name__)

DEFAULT_ACCOUNT = "123456789012"  # moto's default account, the one boto3 with dummy credentials lands in

# Instance states that still count as an instance of an Auto Scaling group.
_LIVE_STATES = frozenset({"pending", "running"})


@dataclass(frozen=True)
class StrictOptions:
    """Delays of the time-based behaviour, in seconds (short in tests, AWS-like in the rehearsal)."""

    boot_delay: float = 3.0  # pending -> running
    detach_delay: float = 10.0  # shutting-down -> terminated; non-DeleteOnTermination ENIs/volumes detach then


# ----------------------------------------------------------------------------------- pure decisions


def reserved_addresses(cidr: IPv4Network) -> frozenset[IPv4Address]:
    """The 5 addresses AWS reserves in every subnet: network, router (+1), DNS (+2), future (+3), broadcast.
    https://docs.aws.amazon.com/vpc/latest/userguide/subnet-sizing.html"""
    base = cidr.network_address
    return frozenset({base, base + 1, base + 2, base + 3, cidr.broadcast_address})


def choose_launch_az(azs: Sequence[str], counts: Mapping[str, int], down: Iterable[str] = ()) -> str | None:
    """The AZ for the next launch: the one with the fewest instances, first in the group's order on a tie;
    None when every AZ is down. https://docs.aws.amazon.com/autoscaling/ec2/userguide/auto-scaling-benefits.html
    ("Auto Scaling ... attempts to distribute instances evenly between the Availability Zones")."""
    unavailable = set(down)
    candidates = [az for az in dict.fromkeys(azs) if az not in unavailable]
    if not candidates:
        return None
    return min(candidates, key=lambda az: (counts.get(az, 0), candidates.index(az)))


@dataclass(frozen=True)
class GroupMember:
    instance_id: str
    az: str
    protected: bool
    launched_at: float


def choose_scale_in(members: Sequence[GroupMember], count: int) -> list[str]:
    """Instances to terminate on scale-in: never one protected from scale-in; from the AZ with the most
    instances first, oldest first (the default termination policy).
    https://docs.aws.amazon.com/autoscaling/ec2/userguide/ec2-auto-scaling-termination-policies.html
    https://docs.aws.amazon.com/autoscaling/ec2/userguide/ec2-auto-scaling-instance-protection.html"""
    remaining = [m for m in members if not m.protected]
    counts = Counter(m.az for m in members)
    chosen: list[str] = []
    while remaining and len(chosen) < count:
        victim = max(remaining, key=lambda m: (counts[m.az], -m.launched_at))
        chosen.append(victim.instance_id)
        counts[victim.az] -= 1
        remaining.remove(victim)
    return chosen


# ----------------------------------------------------------------------------------- the patches


def _in_use(resource: str, holder: str) -> EC2ClientError:
    return EC2ClientError("InvalidNetworkInterface.InUse", f"Interface: [{resource}] in use by {holder}.")


class StrictMoto:
    """Installs the strict patches into moto's classes (process-wide) and advances the clocks.

    Use as a context manager, or :meth:`install` / :meth:`uninstall`. ``clock`` is injectable for tests.
    """

    def __init__(
        self,
        options: StrictOptions = StrictOptions(),
        *,
        account_id: str = DEFAULT_ACCOUNT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.options = options
        self.account_id = account_id
        self.clock = clock
        self.lock = threading.RLock()
        self.down_azs: set[str] = set()
        self._saved: list[tuple[Any, str, Any]] = []
        # Per instance: when it may become running / when its shutdown completes.
        self._boot_at: dict[str, float] = {}
        self._terminate_at: dict[str, float] = {}
        self._launched_at: dict[str, float] = {}
        # Called after a successful attach: the daemon's reconcile loop plugs the NIC or disk at once instead
        # of at its next tick (the rehearsal's hot-plug latency is not what the benchmarks measure).
        self.on_attach: Callable[[], None] = lambda: None

    # -- install / uninstall --------------------------------------------------------------------
    def __enter__(self) -> StrictMoto:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    def _patch(self, owner: Any, name: str, value: Any) -> None:
        """Set ``owner.name`` (a class's or a module's) to ``value`` until :meth:`uninstall`."""
        self._saved.append((owner, name, owner.__dict__.get(name, _MISSING)))
        setattr(owner, name, value)

    def uninstall(self) -> None:
        for cls, name, old in reversed(self._saved):
            if old is _MISSING:
                delattr(cls, name)
            else:
                setattr(cls, name, old)
        self._saved.clear()

    def install(self) -> None:
        if self._saved:
            return
        strict = self
        orig_attach_eni = EC2Backend.attach_network_interface
        orig_attach_volume = EC2Backend.attach_volume
        orig_instance_init = Instance.__init__
        orig_available_ip = Subnet.get_available_subnet_ip
        orig_attachment = NetworkInterface.attachment
        orig_detach_volume = EC2Backend.detach_volume

        def detach_volume(backend: Any, volume_id: str, instance_id: Any, device_path: Any) -> Any:
            # DetachVolume's InstanceId and Device are optional on AWS (API_DetachVolume); moto needs them.
            volume = backend.get_volume(volume_id)
            if volume.attachment is not None:
                instance_id = instance_id or volume.attachment.instance.id
                device_path = device_path or volume.attachment.device
            return orig_detach_volume(backend, volume_id, instance_id, device_path)

        def attach_network_interface(backend: Any, eni_id: str, instance_id: str, device_index: int) -> Any:
            # https://docs.aws.amazon.com/AWSEC2/latest/APIReference/errors-overview.html
            # (InvalidNetworkInterface.InUse): the attach call is the lock.
            eni = backend.get_network_interface(eni_id)
            instance = backend.get_instance(instance_id)
            if eni.instance is not None:
                raise _in_use(eni_id, eni.instance.id)
            _require_attachable(instance)
            if int(device_index) in instance.nics:
                raise EC2ClientError(
                    "InvalidParameterValue",
                    f"Instance '{instance_id}' already has an interface attached at device index '{device_index}'.",
                )
            attached = orig_attach_eni(backend, eni_id, instance_id, device_index)
            strict.on_attach()
            return attached

        def attach_volume(
            backend: Any, volume_id: str, instance_id: str, device_path: str, delete_on_termination: bool = False
        ) -> Any:
            volume = backend.get_volume(volume_id)
            instance = backend.get_instance(instance_id)
            if volume.attachment is not None:
                # https://docs.aws.amazon.com/AWSEC2/latest/APIReference/API_AttachVolume.html (VolumeInUse)
                raise EC2ClientError(
                    "VolumeInUse", f"{volume_id} is already attached to an instance ({volume.attachment.instance.id})"
                )
            if volume.zone is not None and volume.zone.name != instance.availability_zone:
                # "The volume and instance must be within the same Availability Zone" (API_AttachVolume)
                raise EC2ClientError(
                    "InvalidVolume.ZoneMismatch",
                    f"The volume '{volume_id}' is not in the same availability zone as instance '{instance_id}'",
                )
            _require_attachable(instance)
            attached = orig_attach_volume(backend, volume_id, instance_id, device_path, delete_on_termination)
            strict.on_attach()
            return attached

        def instance_init(instance: Any, ec2_backend: Any, *args: Any, **kwargs: Any) -> None:
            template = kwargs.get("launch_template")
            if template and not kwargs.get("metadata_options"):
                # An instance launched from a template gets the template's MetadataOptions and instance
                # profile (moto ignores both).
                data = ec2_backend._get_template_from_args(template).data
                if data.get("MetadataOptions"):
                    kwargs["metadata_options"] = data["MetadataOptions"]
                if data.get("IamInstanceProfile") and not kwargs.get("iam_instance_profile"):
                    kwargs["iam_instance_profile"] = data["IamInstanceProfile"]
            orig_instance_init(instance, ec2_backend, *args, **kwargs)
            # https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/ec2-instance-lifecycle.html: launch -> pending.
            instance._state.name, instance._state.code = "pending", 0
            now = strict.clock()
            strict._boot_at[instance.id] = now + strict.options.boot_delay
            strict._launched_at[instance.id] = now

        def get_available_subnet_ip(subnet: Any, instance: Any) -> str:
            # Never hand out an address an ENI of the subnet already has, nor one of the 5 reserved.
            taken = _eni_addresses(subnet) | {str(a) for a in reserved_addresses(IPv4Network(subnet.cidr_block))}
            while True:
                ip = orig_available_ip(subnet, instance)
                if ip not in taken:
                    return ip
                # Keep moto's bookkeeping for the skipped address pointing at nobody usable.
                subnet._subnet_ips[ip] = None

        def terminate(instance: Any) -> Any:
            return strict._begin_termination(instance)

        def attachment(eni: Any) -> Attachment | None:
            result: Attachment | None = orig_attachment.fget(eni)  # type: ignore[attr-defined]
            if result is not None and getattr(eni, "_strict_detaching", False):
                result.status = "detaching"
            return result

        def replace_instances(group: Any, count_needed: int, propagated_tags: dict[str, str]) -> None:
            for _ in range(count_needed):
                if not strict._launch_one(group, dict(propagated_tags)):
                    break

        orig_set_desired = FakeAutoScalingGroup.set_desired_capacity

        def set_desired_capacity(group: Any, new_capacity: int | None) -> None:
            target = group.min_size if new_capacity is None else new_capacity
            surplus = len(strict._members(group)) - target
            if surplus > 0:
                group.desired_capacity = target
                victims = choose_scale_in(strict._members(group), surplus)
                if victims:
                    group.autoscaling_backend.ec2_backend.terminate_instances(victims)
                group.instance_states = [s for s in group.instance_states if s.instance.id not in victims]
                return
            orig_set_desired(group, new_capacity)

        self._patch(EC2Backend, "attach_network_interface", attach_network_interface)
        self._patch(EC2Backend, "attach_volume", attach_volume)
        self._patch(EC2Backend, "detach_volume", detach_volume)
        self._patch(Instance, "__init__", instance_init)
        self._patch(Instance, "terminate", terminate)
        self._patch(Subnet, "get_available_subnet_ip", get_available_subnet_ip)
        self._patch(NetworkInterface, "attachment", property(attachment))
        self._patch(FakeAutoScalingGroup, "replace_autoscaling_group_instances", replace_instances)
        self._patch(FakeAutoScalingGroup, "set_desired_capacity", set_desired_capacity)

        orig_delete_group = AutoScalingBackend.delete_auto_scaling_group

        def delete_auto_scaling_group(backend: Any, group_name: str) -> None:
            # ForceDelete terminates every instance of the group, scale-in protection or not
            # (API_DeleteAutoScalingGroup). moto reaches them through a scale-in to 0, which correctly spares
            # protected instances, so they would outlive their group. moto ignores the ForceDelete flag; kafka-asg
            # always sends it.
            group = backend.autoscaling_groups.get(group_name)
            if group is not None:
                members = [m.instance_id for m in strict._members(group)]
                if members:
                    backend.ec2_backend.terminate_instances(members)
                group.instance_states = []
            orig_delete_group(backend, group_name)

        self._patch(AutoScalingBackend, "delete_auto_scaling_group", delete_auto_scaling_group)

        orig_create_version = LaunchTemplate.create_version

        def create_version(template: Any, data: dict[str, Any], description: str) -> Any:
            # CreateLaunchTemplateVersion hands moto the user data as the request's base64 text, where
            # CreateLaunchTemplate decodes it first: launching from such a version then fails moto's own check.
            if isinstance(data.get("UserData"), str):
                data = {**data, "UserData": parse_user_data(data["UserData"])}
            return orig_create_version(template, data, description)

        self._patch(LaunchTemplate, "create_version", create_version)

        # Speed, not strictness: moto lists a response class's methods (inspect.getmembers) at every request, about
        # a tenth of the region's CPU per EC2 call while instances boot; the classes never change while it serves.
        self._patch(moto_responses, "method_names_from_class", functools.cache(method_names_from_class))

    # -- termination ------------------------------------------------------------------------------
    def _begin_termination(self, instance: Any) -> Any:
        """TerminateInstances: shutting-down now; ENIs/volumes that survive stay attached ("detaching")
        until the instance reaches terminated after ``detach_delay``.
        https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/terminating-instances.html"""
        import copy

        previous = copy.copy(instance._state)
        if instance._state.name in ("shutting-down", "terminated"):
            return previous
        instance._state.name, instance._state.code = "shutting-down", 32
        for index, nic in instance.nics.items():
            if index != 0 and not nic.delete_on_termination:
                nic._strict_detaching = True
        for mapping in instance.block_device_mapping.values():
            volume = instance.ec2_backend.get_volume(mapping.volume_id)
            if volume.attachment is not None and not mapping.delete_on_termination:
                volume.attachment.status = "detaching"
        self._terminate_at[instance.id] = self.clock() + self.options.detach_delay
        self._boot_at.pop(instance.id, None)
        return previous

    def _finish_termination(self, instance: Any) -> None:
        # The surviving (non-DeleteOnTermination) secondary ENIs detach now; moto's own terminate then
        # detaches the volumes and deletes the DeleteOnTermination ones.
        for index, nic in list(instance.nics.items()):
            nic._strict_detaching = False
            if index != 0 and not nic.delete_on_termination:
                instance.detach_eni(nic)
        primary = instance.nics.get(0)
        _ORIG_TERMINATE(instance)
        if primary is not None:
            # The primary ENI of a launch is deleted with the instance and its address returns to the subnet
            # (moto keeps both, and a small subnet then runs out of addresses after a few replacements).
            instance.ec2_backend.enis.pop(primary.id, None)
            if primary.subnet is not None:
                primary.subnet.del_subnet_ip(str(primary.private_ip_address))
        self._terminate_at.pop(instance.id, None)
        logger.info("%s terminated; its surviving ENIs and volumes are available", instance.id)

    # -- the Auto Scaling group -------------------------------------------------------------------
    def _members(self, group: Any) -> list[GroupMember]:
        return [
            GroupMember(
                instance_id=s.instance.id,
                az=s.instance.availability_zone,
                protected=bool(s.protected_from_scale_in),
                launched_at=self._launched_at.get(s.instance.id, 0.0),
            )
            for s in group.instance_states
            if s.instance.state in _LIVE_STATES
        ]

    def _launch_one(self, group: Any, tags: dict[str, str]) -> bool:
        from moto.autoscaling.models import ASG_NAME_TAG, InstanceState

        backend = group.autoscaling_backend.ec2_backend
        subnet_ids = group.vpc_zone_identifier.split(",") if group.vpc_zone_identifier else []
        subnets = backend.describe_subnets(subnet_ids=subnet_ids) if subnet_ids else []
        subnet_of_az = {s.availability_zone: s.id for s in subnets}
        azs = [s.availability_zone for s in subnets] or list(group.availability_zones)
        counts = Counter(m.az for m in self._members(group))
        az = choose_launch_az(azs, counts, self.down_azs)
        if az is None:
            logger.warning("%s: every AZ of the group is down; no launch", group.name)
            return False
        tags[ASG_NAME_TAG] = group.name
        tags.update(group.instance_tags)
        template = None
        if group.ec2_launch_template:
            lt = group.ec2_launch_template
            template = {"LaunchTemplateId": lt.id} if lt.id else {"LaunchTemplateName": lt.name}
        reservation = backend.run_instances(
            group.image_id,
            1,
            group.user_data,
            group.security_groups,
            instance_type=group.instance_type,
            tags={"instance": tags},
            placement=az,
            launch_config=group.launch_config,
            launch_template=template,
            is_instance_type_default=False,
            associate_public_ip=None,
            subnet_id=subnet_of_az.get(az),
        )
        for instance in reservation.instances:
            instance.autoscaling_group = group
            group.instance_states.append(
                InstanceState(instance, protected_from_scale_in=group.new_instances_protected_from_scale_in)
            )
            logger.info("%s: launched %s in %s", group.name, instance.id, az)
        return True

    def _reconcile_group(self, group: Any) -> None:
        """Replace terminated and Unhealthy instances to keep the desired capacity.
        https://docs.aws.amazon.com/autoscaling/ec2/userguide/ec2-auto-scaling-health-checks.html"""
        backend = group.autoscaling_backend.ec2_backend
        unhealthy = [
            s.instance.id
            for s in group.instance_states
            if s.health_status == "Unhealthy" and s.instance.state in _LIVE_STATES
        ]
        if unhealthy:
            logger.info("%s: replacing unhealthy %s", group.name, ", ".join(unhealthy))
            backend.terminate_instances(unhealthy)
        group.instance_states = [s for s in group.instance_states if s.instance.state in _LIVE_STATES]
        missing = (group.desired_capacity or 0) - len(group.instance_states)
        for _ in range(max(0, missing)):
            if not self._launch_one(group, group.get_propagated_tags()):
                break

    # -- the clock ----------------------------------------------------------------------------------
    def tick(self, regions: Iterable[str]) -> None:
        """Advance every time-based behaviour in ``regions`` to now."""
        with self.lock:
            now = self.clock()
            for region in regions:
                ec2 = ec2_backends[self.account_id][region]
                for instance in list(ec2.all_instances()):
                    boot_at = self._boot_at.get(instance.id)
                    if boot_at is not None and now >= boot_at and instance.state == "pending":
                        instance._state.name, instance._state.code = "running", 16
                        self._boot_at.pop(instance.id, None)
                    end_at = self._terminate_at.get(instance.id)
                    if end_at is not None and now >= end_at:
                        self._finish_termination(instance)
                for group in list(autoscaling_backends[self.account_id][region].autoscaling_groups.values()):
                    self._reconcile_group(group)


class _Missing:
    pass


_MISSING = _Missing()
_ORIG_TERMINATE: Callable[[Any], Any] = Instance.terminate


def _require_attachable(instance: Any) -> None:
    if instance.state not in ("pending", "running", "stopping", "stopped"):
        raise EC2ClientError(
            "IncorrectInstanceState",
            f"The instance '{instance.id}' is not in a state from which it can be attached ({instance.state}).",
        )


def _eni_addresses(subnet: Any) -> set[str]:
    backend = subnet.ec2_backend
    found: set[str] = set()
    for eni in backend.enis.values():
        if eni.subnet is not None and eni.subnet.id == subnet.id:
            found.add(str(eni.private_ip_address))
            for extra in eni.private_ip_addresses or []:
                if isinstance(extra, dict) and extra.get("PrivateIpAddress"):
                    found.add(str(extra["PrivateIpAddress"]))
    return found
