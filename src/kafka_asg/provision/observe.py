"""Read what exists in AWS into :class:`~kafka_asg.provision.plan.Observed` (read-only calls only)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from ipaddress import IPv4Network
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from kafka_asg.config import CLUSTER_TAG, ROLE_TAG, SLOT_TAG, ClusterConfig
from kafka_asg.errors import CloudError, ConfigError
from kafka_asg.provision.clients import AwsClients, call, call_or_none
from kafka_asg.provision.plan import (
    POLICY_NAME,
    SHA_METADATA,
    AsgState,
    BucketState,
    Desired,
    EniState,
    IamState,
    LaunchTemplateState,
    Network,
    Observed,
    Rule,
    SecurityGroupState,
    VolumeState,
)

if TYPE_CHECKING:
    from mypy_boto3_ec2.type_defs import FilterTypeDef, IpPermissionOutputTypeDef, TagTypeDef

logger = logging.getLogger(__name__)


def tag_map(tags: Sequence[TagTypeDef] | Sequence[Mapping[str, Any]] | None) -> dict[str, str]:
    return {str(t["Key"]): str(t["Value"]) for t in tags or []}


def cluster_filter(cfg: ClusterConfig) -> list[FilterTypeDef]:
    return [{"Name": f"tag:{CLUSTER_TAG}", "Values": [cfg.name]}]


def find_network(cfg: ClusterConfig, clients: AwsClients) -> Network:
    """The account's VPC (by id, else by CIDR) and the subnet holding each slot's IP. Never created here."""
    ec2 = clients.ec2
    if cfg.vpc_id:
        vpcs = call_or_none("describe VPC", lambda: ec2.describe_vpcs(VpcIds=[cfg.vpc_id or ""])["Vpcs"]) or []
    else:
        all_vpcs = call("describe VPCs", lambda: ec2.describe_vpcs()["Vpcs"])
        vpcs = [v for v in all_vpcs if v.get("CidrBlock") == str(cfg.vpc_cidr)]
    if not vpcs:
        which = cfg.vpc_id or f"with CIDR {cfg.vpc_cidr}"
        raise ConfigError(
            [f"vpc: no VPC {which} in {cfg.region}; create it (kafka-asg never does) or fix vpc.cidr/vpc.id"]
        )
    if len(vpcs) > 1:
        ids = ", ".join(v["VpcId"] for v in vpcs)
        raise ConfigError([f"vpc: several VPCs have CIDR {cfg.vpc_cidr} ({ids}); set vpc.id to pick one"])
    vpc_id = vpcs[0]["VpcId"]
    if vpcs[0].get("CidrBlock") != str(cfg.vpc_cidr):
        raise ConfigError([f"vpc: {vpc_id} has CIDR {vpcs[0].get('CidrBlock')}, the config says {cfg.vpc_cidr}"])
    subnets = call(
        "describe subnets",
        lambda: ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc_id]}])["Subnets"],
    )
    problems: list[str] = []
    found: dict[str, str] = {}
    for slot in cfg.slots:
        match = [s for s in subnets if slot.ip in IPv4Network(s["CidrBlock"])]
        if not match:
            problems.append(
                f"slots: no subnet of {vpc_id} contains slot {slot.number}'s IP {slot.ip}; create subnet "
                f"{slot.subnet.cidr} in {slot.az} (kafka-asg never creates subnets)"
            )
            continue
        subnet = match[0]
        if subnet["AvailabilityZone"] != slot.az:
            problems.append(
                f"slots: slot {slot.number}'s IP {slot.ip} is in {subnet['SubnetId']} of {subnet['AvailabilityZone']}, "
                f"but the config puts the slot in {slot.az}; fix the slot's az"
            )
        elif subnet["CidrBlock"] != str(slot.subnet.cidr):
            problems.append(
                f"subnets: slot {slot.number}'s subnet is {subnet['CidrBlock']}, the config has {slot.subnet.cidr}; "
                "list the real subnets under [[subnets]]"
            )
        found[str(slot.subnet.cidr)] = subnet["SubnetId"]
    if problems:
        raise ConfigError(problems)
    return Network(vpc_id=vpc_id, subnet_ids=found)


def _rules(perms: Sequence[IpPermissionOutputTypeDef], own_id: str) -> frozenset[Rule]:
    rules: set[Rule] = set()
    for perm in perms:
        proto = str(perm.get("IpProtocol", "-1"))
        lo, hi = int(perm.get("FromPort", -1)), int(perm.get("ToPort", -1))
        for rng in perm.get("IpRanges", []):
            rules.add((proto, lo, hi, "cidr", rng["CidrIp"]))
        for pair in perm.get("UserIdGroupPairs", []):
            gid = pair.get("GroupId", "")
            rules.add((proto, lo, hi, "sg", "self" if gid == own_id else gid))
    return frozenset(rules)


def security_groups(cfg: ClusterConfig, clients: AwsClients, vpc_id: str) -> list[Any]:
    """The cluster's security group(s) in the VPC, found by name (EC2's describe shape)."""
    return list(
        call(
            "describe security group",
            lambda: clients.ec2.describe_security_groups(
                Filters=[
                    {"Name": "vpc-id", "Values": [vpc_id]},
                    {"Name": "group-name", "Values": [cfg.security_group_name]},
                ]
            )["SecurityGroups"],
        )
    )


def _security_group(cfg: ClusterConfig, clients: AwsClients, vpc_id: str) -> SecurityGroupState | None:
    groups = security_groups(cfg, clients, vpc_id)
    if not groups:
        return None
    group = groups[0]
    return SecurityGroupState(group_id=group["GroupId"], rules=_rules(group.get("IpPermissions", []), group["GroupId"]))


def _enis(cfg: ClusterConfig, clients: AwsClients) -> dict[int, EniState]:
    enis: dict[int, EniState] = {}
    found = call(
        "describe ENIs",
        lambda: clients.ec2.describe_network_interfaces(Filters=cluster_filter(cfg))["NetworkInterfaces"],
    )
    for eni in found:
        tags = tag_map(eni.get("TagSet"))
        if not tags.get(SLOT_TAG, "").isdigit():
            continue
        enis[int(tags[SLOT_TAG])] = EniState(
            eni_id=eni["NetworkInterfaceId"],
            slot=int(tags[SLOT_TAG]),
            ip=eni.get("PrivateIpAddress", ""),
            subnet_id=eni.get("SubnetId", ""),
            groups=frozenset(g["GroupId"] for g in eni.get("Groups", [])),
            status=eni.get("Status", ""),
            name_tag=tags.get("Name"),
        )
    return enis


def cluster_volumes(cfg: ClusterConfig, clients: AwsClients) -> dict[tuple[int, str], VolumeState]:
    volumes: dict[tuple[int, str], VolumeState] = {}
    filters: list[FilterTypeDef] = [*cluster_filter(cfg), {"Name": "tag-key", "Values": [SLOT_TAG]}]
    found = call("describe volumes", lambda: clients.ec2.describe_volumes(Filters=filters)["Volumes"])
    for vol in found:
        tags = tag_map(vol.get("Tags"))
        if not tags.get(SLOT_TAG, "").isdigit() or vol.get("State") in ("deleting", "deleted"):
            continue
        key = (int(tags[SLOT_TAG]), tags.get(ROLE_TAG, ""))
        volumes[key] = VolumeState(
            volume_id=vol["VolumeId"], slot=key[0], role=key[1], az=vol["AvailabilityZone"], state=vol["State"]
        )
    return volumes


def _iam(cfg: ClusterConfig, clients: AwsClients) -> IamState:
    iam = clients.iam
    role = call_or_none("get role", lambda: iam.get_role(RoleName=cfg.role_name))
    policy: dict[str, Any] | None = None
    if role is not None:
        got = call_or_none(
            "get role policy", lambda: iam.get_role_policy(RoleName=cfg.role_name, PolicyName=POLICY_NAME)
        )
        if got is not None:
            doc = got["PolicyDocument"]
            # IAM returns the document URL-encoded; boto3 decodes it, other endpoints may not.
            policy = json.loads(unquote(doc)) if isinstance(doc, str) else dict(doc)
    profile = call_or_none(
        "get instance profile", lambda: iam.get_instance_profile(InstanceProfileName=cfg.instance_profile_name)
    )
    roles = frozenset(r["RoleName"] for r in profile["InstanceProfile"]["Roles"]) if profile else frozenset()
    return IamState(
        role_exists=role is not None, policy=policy, profile_exists=profile is not None, profile_roles=roles
    )


def _bucket(cfg: ClusterConfig, clients: AwsClients, keys: Sequence[str]) -> BucketState:
    s3 = clients.s3
    try:
        exists = call_or_none("head bucket", lambda: s3.head_bucket(Bucket=cfg.bucket)) is not None
    except CloudError as exc:
        if exc.code in ("403", "AccessDenied"):
            raise CloudError(
                f"bucket {cfg.bucket} exists but is not yours (S3 names are global); choose another bucket name",
                exc.code,
            ) from exc
        raise
    if not exists:
        return BucketState(False, False, False, {})
    pab = call_or_none("get public access block", lambda: s3.get_public_access_block(Bucket=cfg.bucket))
    blocked = bool(pab) and all(pab["PublicAccessBlockConfiguration"].values()) if pab else False
    enc = call_or_none("get bucket encryption", lambda: s3.get_bucket_encryption(Bucket=cfg.bucket))
    shas: dict[str, str | None] = {}
    for key in keys:
        head = call_or_none(f"head s3://{cfg.bucket}/{key}", lambda key=key: s3.head_object(Bucket=cfg.bucket, Key=key))  # type: ignore[misc]
        if head is not None:
            shas[key] = head.get("Metadata", {}).get(SHA_METADATA)
    return BucketState(exists=True, public_access_blocked=blocked, encrypted=enc is not None, object_sha256=shas)


def _launch_template(cfg: ClusterConfig, clients: AwsClients) -> LaunchTemplateState | None:
    ec2 = clients.ec2
    found = call_or_none(
        "describe launch template",
        lambda: ec2.describe_launch_templates(LaunchTemplateNames=[cfg.launch_template_name])["LaunchTemplates"],
    )
    if not found:
        return None
    lt_id = found[0]["LaunchTemplateId"]
    versions = call(
        "describe launch template version",
        lambda: ec2.describe_launch_template_versions(LaunchTemplateId=lt_id, Versions=["$Latest"])[
            "LaunchTemplateVersions"
        ],
    )
    latest = versions[0] if versions else {}
    return LaunchTemplateState(
        template_id=lt_id,
        latest_version=int(latest.get("VersionNumber", 0)),
        latest_description=str(latest.get("VersionDescription", "")),
    )


def _asg(cfg: ClusterConfig, clients: AwsClients) -> AsgState | None:
    groups = call(
        "describe auto scaling group",
        lambda: clients.autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[cfg.asg_name])[
            "AutoScalingGroups"
        ],
    )
    groups = [g for g in groups if g.get("Status") != "Delete in progress"]
    if not groups:
        return None
    g = groups[0]
    lt = g.get("LaunchTemplate", {})
    policy = g.get("InstanceMaintenancePolicy")
    return AsgState(
        min=g["MinSize"],
        desired=g["DesiredCapacity"],
        max=g["MaxSize"],
        subnet_ids=frozenset(s for s in g.get("VPCZoneIdentifier", "").split(",") if s),
        launch_template=lt.get("LaunchTemplateName"),
        launch_template_version=lt.get("Version"),
        maintenance_policy=dict(policy) if policy else None,  # type: ignore[arg-type]
        suspended=frozenset(p["ProcessName"] for p in g.get("SuspendedProcesses", [])),
        tags={t["Key"]: t["Value"] for t in g.get("Tags", [])},
    )


def account(clients: AwsClients) -> tuple[str, str]:
    """(account id, partition) of the credentials in use."""
    ident = call("get caller identity", clients.sts.get_caller_identity)
    arn = ident["Arn"]
    return ident["Account"], arn.split(":")[1] if arn.startswith("arn:") else "aws"


def observe(cfg: ClusterConfig, clients: AwsClients, object_keys: Sequence[str]) -> Observed:
    """Everything provisioning manages, found by name or by the cluster tag."""
    account_id, partition = account(clients)
    network = find_network(cfg, clients)
    return Observed(
        account_id=account_id,
        partition=partition,
        network=network,
        security_group=_security_group(cfg, clients, network.vpc_id),
        enis=_enis(cfg, clients),
        volumes=cluster_volumes(cfg, clients),
        iam=_iam(cfg, clients),
        bucket=_bucket(cfg, clients, object_keys),
        launch_template=_launch_template(cfg, clients),
        asg=_asg(cfg, clients),
    )


def object_keys(desired: Desired) -> list[str]:
    return [o.key for o in desired.objects]
