"""``plan``, ``up`` and ``down``: a dumb executor of :func:`~kafka_asg.provision.plan.diff`'s changes.

``up`` is safe to interrupt and re-run: every step is found again by name or tag on the next run, and a
created resource carries its tags from its create call (TagSpecifications), so nothing half-made is lost.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kafka_asg.config import CLUSTER_TAG, ROLE_TAG, SLOT_TAG, ClusterConfig
from kafka_asg.errors import CloudError, ConfigError, NotFoundError, Unavailable
from kafka_asg.provision.clients import AWS_RETRY, AwsClients, call, call_or_none
from kafka_asg.provision.inputs import ProvisionInputs
from kafka_asg.provision.observe import (
    account,
    cluster_filter,
    cluster_volumes,
    find_network,
    object_keys,
    observe,
    security_groups,
)
from kafka_asg.provision.plan import (
    ASSUME_ROLE_POLICY,
    MAINTENANCE_POLICY,
    POLICY_NAME,
    SHA_METADATA,
    SUSPENDED_PROCESSES,
    Change,
    Desired,
    Observed,
    Plan,
    Rule,
    desired_state,
    diff,
    launch_template_data,
    launch_template_description,
)
from kafka_asg.retry import wait_until

if TYPE_CHECKING:
    from mypy_boto3_ec2.literals import ResourceTypeType
    from mypy_boto3_ec2.type_defs import IpPermissionTypeDef, TagSpecificationTypeDef

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]

# Bounded waits in down: ASG instances terminating and releasing ENIs can take minutes on AWS (ENIs sat in
# "detaching" > 200 s in amazon.aws PR #501).
DOWN_WAIT_SECONDS = 600.0
POLL_SECONDS = 2.0


def _tags(cfg: ClusterConfig, **extra: str) -> list[Any]:
    """Key/Value tag list (the shape EC2, IAM and S3 share; typed loosely because each stub names it apart)."""
    return [{"Key": k, "Value": v} for k, v in sorted({**cfg.base_tags(), **extra}.items())]


def _spec(resource: ResourceTypeType, cfg: ClusterConfig, **extra: str) -> list[TagSpecificationTypeDef]:
    return [{"ResourceType": resource, "Tags": _tags(cfg, **extra)}]


def _desired(cfg: ClusterConfig, clients: AwsClients, inputs: ProvisionInputs) -> tuple[Observed, Desired]:
    account_id, partition = account(clients)
    desired = desired_state(cfg, inputs, account_id=account_id, partition=partition)
    return observe(cfg, clients, object_keys(desired)), desired


def plan(cfg: ClusterConfig, clients: AwsClients, inputs: ProvisionInputs) -> Plan:
    """What ``up`` would change, and why (read-only)."""
    observed, desired = _desired(cfg, clients, inputs)
    return diff(observed, desired)


# ============================================================================== executors


@dataclass
class _Context:
    """What later changes need from earlier ones in the same run (ids of just-created resources)."""

    cfg: ClusterConfig
    clients: AwsClients
    observed: Observed
    desired: Desired
    sg_id: str | None

    def group_id(self) -> str:
        if self.sg_id is None:
            raise CloudError(f"security group {self.cfg.security_group_name} is missing; re-run `kafka-asg up`")
        return self.sg_id


def _create_bucket(ctx: _Context, _: Change) -> None:
    cfg, s3 = ctx.cfg, ctx.clients.s3
    if cfg.region == "us-east-1":  # us-east-1 rejects an explicit LocationConstraint for itself
        call("create bucket", lambda: s3.create_bucket(Bucket=cfg.bucket))
    else:
        call(
            "create bucket",
            lambda: s3.create_bucket(
                Bucket=cfg.bucket,
                CreateBucketConfiguration={"LocationConstraint": cfg.region},  # type: ignore[typeddict-item]
            ),
        )
    call("tag bucket", lambda: s3.put_bucket_tagging(Bucket=cfg.bucket, Tagging={"TagSet": _tags(cfg)}))


def _bucket_settings(ctx: _Context, _: Change) -> None:
    cfg, s3 = ctx.cfg, ctx.clients.s3
    call(
        "block public access",
        lambda: s3.put_public_access_block(
            Bucket=cfg.bucket,
            PublicAccessBlockConfiguration={
                "BlockPublicAcls": True,
                "IgnorePublicAcls": True,
                "BlockPublicPolicy": True,
                "RestrictPublicBuckets": True,
            },
        ),
    )
    call(
        "default encryption",
        lambda: s3.put_bucket_encryption(
            Bucket=cfg.bucket,
            ServerSideEncryptionConfiguration={
                "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]
            },
        ),
    )


def _put_object(ctx: _Context, change: Change) -> None:
    cfg, s3 = ctx.cfg, ctx.clients.s3
    obj = next(o for o in ctx.desired.objects if o.key == change.params["key"])
    meta = {SHA_METADATA: obj.sha256}
    if obj.body is not None:
        body = obj.body
        call(f"put {obj.key}", lambda: s3.put_object(Bucket=cfg.bucket, Key=obj.key, Body=body, Metadata=meta))
    else:
        assert obj.path is not None
        path = obj.path

        def upload() -> None:
            with path.open("rb") as fh:
                s3.put_object(Bucket=cfg.bucket, Key=obj.key, Body=fh, Metadata=meta)

        call(f"put {obj.key}", upload)


def _create_security_group(ctx: _Context, _: Change) -> None:
    cfg = ctx.cfg
    created = call(
        "create security group",
        lambda: ctx.clients.ec2.create_security_group(
            GroupName=cfg.security_group_name,
            Description=f"kafka-asg {cfg.name}: ZooKeeper and Kafka from the VPC",
            VpcId=ctx.observed.network.vpc_id,
            TagSpecifications=_spec("security-group", cfg, Name=cfg.security_group_name),
        ),
    )
    ctx.sg_id = created["GroupId"]


def _permissions(rules: list[Rule], own_id: str) -> list[IpPermissionTypeDef]:
    perms: list[IpPermissionTypeDef] = []
    for proto, lo, hi, kind, source in rules:
        perm: IpPermissionTypeDef = {"IpProtocol": proto}
        if proto != "-1":
            perm["FromPort"], perm["ToPort"] = lo, hi
        if kind == "cidr":
            perm["IpRanges"] = [{"CidrIp": source}]
        else:
            perm["UserIdGroupPairs"] = [{"GroupId": own_id if source == "self" else source}]
        perms.append(perm)
    return perms


def _security_group_rules(ctx: _Context, change: Change) -> None:
    ec2, gid = ctx.clients.ec2, ctx.group_id()
    if change.params.get("add"):
        perms = _permissions(list(change.params["add"]), gid)
        call("authorize ingress", lambda: ec2.authorize_security_group_ingress(GroupId=gid, IpPermissions=perms))
    if change.params.get("remove"):
        perms = _permissions(list(change.params["remove"]), gid)
        call("revoke ingress", lambda: ec2.revoke_security_group_ingress(GroupId=gid, IpPermissions=perms))


def _create_role(ctx: _Context, _: Change) -> None:
    cfg = ctx.cfg
    call(
        "create role",
        lambda: ctx.clients.iam.create_role(
            RoleName=cfg.role_name,
            AssumeRolePolicyDocument=json.dumps(ASSUME_ROLE_POLICY),
            Description=f"kafka-asg {cfg.name} node agent",
            Tags=_tags(cfg),
        ),
    )


def _put_policy(ctx: _Context, _: Change) -> None:
    cfg, doc = ctx.cfg, json.dumps(ctx.desired.policy)
    call(
        "put role policy",
        lambda: ctx.clients.iam.put_role_policy(RoleName=cfg.role_name, PolicyName=POLICY_NAME, PolicyDocument=doc),
    )


def _instance_profile(ctx: _Context, change: Change) -> None:
    cfg, iam = ctx.cfg, ctx.clients.iam
    if change.action == "create":
        call(
            "create instance profile",
            lambda: iam.create_instance_profile(InstanceProfileName=cfg.instance_profile_name, Tags=_tags(cfg)),
        )
    for role in ctx.observed.iam.profile_roles - {cfg.role_name}:
        call(
            "remove role from profile",
            lambda role=role: iam.remove_role_from_instance_profile(  # type: ignore[misc]
                InstanceProfileName=cfg.instance_profile_name, RoleName=role
            ),
        )
    if cfg.role_name not in ctx.observed.iam.profile_roles:
        call(
            "add role to profile",
            lambda: iam.add_role_to_instance_profile(
                InstanceProfileName=cfg.instance_profile_name, RoleName=cfg.role_name
            ),
        )


def _eni(ctx: _Context, change: Change) -> None:
    cfg, ec2 = ctx.cfg, ctx.clients.ec2
    slot = cfg.slot(int(change.params["slot"]))
    if change.action == "replace":
        if change.params["status"] != "available":
            raise CloudError(
                f"ENI {change.params['eni_id']} of slot {slot.number} must be replaced but is "
                f"{change.params['status']}; "
                "run `kafka-asg down` first (it holds the slot's address)"
            )
        call("delete ENI", lambda: ec2.delete_network_interface(NetworkInterfaceId=change.params["eni_id"]))
    if change.action in ("create", "replace"):
        subnet_id = ctx.observed.network.subnet_ids[str(slot.subnet.cidr)]
        call(
            f"create ENI for slot {slot.number}",
            lambda: ec2.create_network_interface(
                SubnetId=subnet_id,
                PrivateIpAddress=str(slot.ip),
                Groups=[ctx.group_id()],
                Description=f"kafka-asg {cfg.name} slot {slot.number}",
                TagSpecifications=_spec("network-interface", cfg, Name=cfg.eni_name, **{SLOT_TAG: str(slot.number)}),
            ),
        )
        return
    eni_id = change.params["eni_id"]
    call(
        "set ENI groups",
        lambda: ec2.modify_network_interface_attribute(NetworkInterfaceId=eni_id, Groups=[ctx.group_id()]),
    )
    call(
        "tag ENI",
        lambda: ec2.create_tags(Resources=[eni_id], Tags=_tags(cfg, Name=cfg.eni_name, **{SLOT_TAG: str(slot.number)})),
    )


def _volume(ctx: _Context, change: Change) -> None:
    cfg = ctx.cfg
    slot = cfg.slot(int(change.params["slot"]))
    role = str(change.params["role"])
    call(
        f"create {role} volume for slot {slot.number}",
        lambda: ctx.clients.ec2.create_volume(
            AvailabilityZone=slot.az,
            Size=cfg.volume.size_gib,
            VolumeType=cfg.volume.volume_type,  # type: ignore[arg-type]
            Encrypted=cfg.volume.encrypted,
            TagSpecifications=_spec(
                "volume", cfg, Name=f"{cfg.name}-{slot.number}-{role}", **{SLOT_TAG: str(slot.number), ROLE_TAG: role}
            ),
        ),
    )


def _launch_template(ctx: _Context, change: Change) -> None:
    cfg, ec2 = ctx.cfg, ctx.clients.ec2
    data = launch_template_data(cfg, ctx.desired.user_data_b64, ctx.group_id())
    description = launch_template_description(ctx.desired.launch_template_digest)
    if change.action == "create":
        call(
            "create launch template",
            lambda: ec2.create_launch_template(
                LaunchTemplateName=cfg.launch_template_name,
                VersionDescription=description,
                LaunchTemplateData=data,  # type: ignore[arg-type]
                TagSpecifications=_spec("launch-template", cfg),
            ),
        )
    else:
        # The ASG follows $Latest, so a new version is the whole update.
        call(
            "create launch template version",
            lambda: ec2.create_launch_template_version(
                LaunchTemplateName=cfg.launch_template_name,
                VersionDescription=description,
                LaunchTemplateData=data,  # type: ignore[arg-type]
            ),
        )


def _asg(ctx: _Context, change: Change) -> None:
    cfg, asg = ctx.cfg, ctx.clients.autoscaling
    subnets = ",".join(sorted(ctx.observed.network.subnet_ids[str(s.cidr)] for s in cfg.subnets))
    common: dict[str, Any] = {
        "AutoScalingGroupName": cfg.asg_name,
        "LaunchTemplate": {"LaunchTemplateName": cfg.launch_template_name, "Version": "$Latest"},
        "MinSize": cfg.asg.min,
        "MaxSize": cfg.asg.max,
        "DesiredCapacity": cfg.asg.desired,
        "VPCZoneIdentifier": subnets,
        "InstanceMaintenancePolicy": MAINTENANCE_POLICY,
    }
    if change.action == "create":
        tags: list[Any] = [
            {"ResourceId": cfg.asg_name, "ResourceType": "auto-scaling-group", "PropagateAtLaunch": True, **t}
            for t in _tags(cfg)
        ]
        call("create auto scaling group", lambda: asg.create_auto_scaling_group(**common, Tags=tags))
    else:
        call("update auto scaling group", lambda: asg.update_auto_scaling_group(**common))


def _asg_tags(ctx: _Context, _: Change) -> None:
    cfg = ctx.cfg
    tags = [
        {"ResourceId": cfg.asg_name, "ResourceType": "auto-scaling-group", "PropagateAtLaunch": True, **t}
        for t in _tags(cfg)
    ]
    call("tag auto scaling group", lambda: ctx.clients.autoscaling.create_or_update_tags(Tags=tags))  # type: ignore[arg-type]


def _asg_processes(ctx: _Context, _: Change) -> None:
    call(
        "suspend AZRebalance",
        lambda: ctx.clients.autoscaling.suspend_processes(
            AutoScalingGroupName=ctx.cfg.asg_name, ScalingProcesses=sorted(SUSPENDED_PROCESSES)
        ),
    )


_EXECUTORS: dict[str, Callable[[_Context, Change], None]] = {
    "bucket": _create_bucket,
    "bucket-settings": _bucket_settings,
    "object": _put_object,
    "security-group": _create_security_group,
    "sg-rules": _security_group_rules,
    "iam-role": _create_role,
    "iam-policy": _put_policy,
    "instance-profile": _instance_profile,
    "eni": _eni,
    "volume": _volume,
    "launch-template": _launch_template,
    "asg": _asg,
    "asg-tags": _asg_tags,
    "asg-processes": _asg_processes,
}


def up(cfg: ClusterConfig, clients: AwsClients, inputs: ProvisionInputs, progress: Progress) -> Plan:
    """Apply the plan in dependency order; returns the plan that was applied (empty: nothing to do)."""
    observed, desired = _desired(cfg, clients, inputs)
    the_plan = diff(observed, desired)
    sg = observed.security_group
    ctx = _Context(cfg, clients, observed, desired, sg.group_id if sg else None)
    for number, change in enumerate(the_plan.changes, start=1):
        progress(f"[{number}/{len(the_plan.changes)}] {change.action} {change.kind} {change.name}: {change.reason}")
        _EXECUTORS[change.kind](ctx, change)
    progress(f"up: {len(the_plan.changes)} change(s) applied" if the_plan.changes else "up: nothing to do")
    return the_plan


# ============================================================================== down


def _wait(what: str, predicate: Callable[[], bool], deadline: float) -> None:
    wait_until(what, lambda: predicate() or None, deadline=deadline, interval=POLL_SECONDS)


def _delete(what: str, func: Callable[[], object], progress: Progress) -> None:
    """Delete, counting NotFound as done (amazon.aws ``deletion_error_handler``)."""
    try:
        call(what, func)
        progress(f"deleted {what}")
    except NotFoundError:
        logger.debug("%s: already gone", what)


def down(
    cfg: ClusterConfig,
    clients: AwsClients,
    *,
    delete_data: bool,
    progress: Progress,
    wait_seconds: float = DOWN_WAIT_SECONDS,
) -> None:
    """Remove every resource in reverse dependency order. Per-slot volumes stay unless ``delete_data``."""
    ec2, asg, iam = clients.ec2, clients.autoscaling, clients.iam

    groups = call(
        "describe auto scaling group",
        lambda: asg.describe_auto_scaling_groups(AutoScalingGroupNames=[cfg.asg_name])["AutoScalingGroups"],
    )
    if groups and groups[0].get("Status") != "Delete in progress":
        # ForceDelete terminates the instances too.
        _delete(
            f"auto scaling group {cfg.asg_name}",
            lambda: asg.delete_auto_scaling_group(AutoScalingGroupName=cfg.asg_name, ForceDelete=True),
            progress,
        )

    def instances_gone() -> bool:
        live = call(
            "describe ASG instances",
            lambda: ec2.describe_instances(
                Filters=[
                    {"Name": "tag:aws:autoscaling:groupName", "Values": [cfg.asg_name]},
                    {
                        "Name": "instance-state-name",
                        "Values": ["pending", "running", "shutting-down", "stopping", "stopped"],
                    },
                ]
            )["Reservations"],
        )
        return not any(r["Instances"] for r in live)

    progress("waiting for the group's instances to terminate")
    _wait(f"instances of {cfg.asg_name} to terminate", instances_gone, wait_seconds)
    _wait(
        f"auto scaling group {cfg.asg_name} to go",
        lambda: (
            not call(
                "describe auto scaling group",
                lambda: asg.describe_auto_scaling_groups(AutoScalingGroupNames=[cfg.asg_name])["AutoScalingGroups"],
            )
        ),
        wait_seconds,
    )

    templates = call_or_none(
        "describe launch template",
        lambda: ec2.describe_launch_templates(LaunchTemplateNames=[cfg.launch_template_name])["LaunchTemplates"],
    )
    for template in templates or []:
        lt_id = template["LaunchTemplateId"]
        _delete(
            f"launch template {cfg.launch_template_name}",
            lambda lt_id=lt_id: ec2.delete_launch_template(LaunchTemplateId=lt_id),  # type: ignore[misc]
            progress,
        )

    profile = call_or_none(
        "get instance profile", lambda: iam.get_instance_profile(InstanceProfileName=cfg.instance_profile_name)
    )
    if profile is not None:
        for role in profile["InstanceProfile"]["Roles"]:
            _delete(
                f"role {role['RoleName']} from profile",
                lambda role=role: iam.remove_role_from_instance_profile(  # type: ignore[misc]
                    InstanceProfileName=cfg.instance_profile_name, RoleName=role["RoleName"]
                ),
                progress,
            )
        _delete(
            f"instance profile {cfg.instance_profile_name}",
            lambda: iam.delete_instance_profile(InstanceProfileName=cfg.instance_profile_name),
            progress,
        )
    if call_or_none("get role", lambda: iam.get_role(RoleName=cfg.role_name)) is not None:
        _delete(
            f"policy {POLICY_NAME}",
            lambda: iam.delete_role_policy(RoleName=cfg.role_name, PolicyName=POLICY_NAME),
            progress,
        )
        _delete(f"role {cfg.role_name}", lambda: iam.delete_role(RoleName=cfg.role_name), progress)

    # ENIs: an attachment lasts until the old instance is terminated; wait (bounded) for "available".
    def enis() -> list[Any]:
        return list(
            call(
                "describe ENIs",
                lambda: ec2.describe_network_interfaces(Filters=cluster_filter(cfg))["NetworkInterfaces"],
            )
        )

    if enis():
        progress("waiting for the slot ENIs to be released")
        _wait("slot ENIs to become available", lambda: all(e["Status"] == "available" for e in enis()), wait_seconds)
    for eni in enis():
        eni_id = eni["NetworkInterfaceId"]
        _delete(
            f"ENI {eni_id} ({eni.get('PrivateIpAddress')})",
            lambda eni_id=eni_id: ec2.delete_network_interface(NetworkInterfaceId=eni_id),  # type: ignore[misc]
            progress,
        )

    volumes = cluster_volumes(cfg, clients)
    if volumes and not delete_data:
        progress(f"kept {len(volumes)} per-slot data volume(s) (down --delete-data removes them)")
    elif volumes:
        ids = [v.volume_id for v in volumes.values()]

        def volumes_free() -> bool:
            vols = call("describe volumes", lambda: ec2.describe_volumes(VolumeIds=ids)["Volumes"])
            return all(v["State"] == "available" for v in vols)

        _wait("data volumes to be detached", volumes_free, wait_seconds)
        for vol in volumes.values():
            _delete(
                f"volume {vol.volume_id} (slot {vol.slot} {vol.role})",
                lambda vol=vol: ec2.delete_volume(VolumeId=vol.volume_id),  # type: ignore[misc]
                progress,
            )

    try:
        network = find_network(cfg, clients)
    except ConfigError:
        # The account's VPC (or a subnet) is gone; a security group cannot outlive its VPC.
        progress("VPC or subnets not found: no security group left to delete")
        found = []
    else:
        found = security_groups(cfg, clients, network.vpc_id)
    for group in found:
        gid = group["GroupId"]
        # DependencyViolation while a terminated instance's NIC still references the group: retry, bounded.
        retry = AWS_RETRY.with_deadline(wait_seconds)

        def delete_group(gid: str = gid) -> None:
            try:
                call(f"delete security group {gid}", lambda: ec2.delete_security_group(GroupId=gid))
            except CloudError as exc:
                if exc.code == "DependencyViolation":
                    raise Unavailable(str(exc)) from exc
                raise

        try:
            retry(f"delete security group {gid}", delete_group)
            progress(f"deleted security group {gid}")
        except NotFoundError:
            pass

    _delete_bucket(cfg, clients, progress)
    progress("down: done")


def _delete_bucket(cfg: ClusterConfig, clients: AwsClients, progress: Progress) -> None:
    s3 = clients.s3
    if call_or_none("head bucket", lambda: s3.head_bucket(Bucket=cfg.bucket)) is None:
        return
    paginator = s3.get_paginator("list_object_versions")
    for page in call("list objects", lambda: list(paginator.paginate(Bucket=cfg.bucket))):
        items = [
            {"Key": v["Key"], "VersionId": v["VersionId"]}
            for v in [*page.get("Versions", []), *page.get("DeleteMarkers", [])]
        ]
        if items:
            call("delete objects", lambda items=items: s3.delete_objects(Bucket=cfg.bucket, Delete={"Objects": items}))  # type: ignore[misc]
    _delete(f"bucket {cfg.bucket}", lambda: s3.delete_bucket(Bucket=cfg.bucket), progress)


__all__ = ["CLUSTER_TAG", "down", "plan", "up"]
