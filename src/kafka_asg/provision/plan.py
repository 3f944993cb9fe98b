"""Desired state, observed state, and the pure diff between them (pyinfra/terraform style).

``observe`` (observe.py) reads AWS into :class:`Observed`; :func:`desired_state` builds :class:`Desired`
from the config and the inputs; :func:`diff` is pure and returns a :class:`Plan` whose every change and
every no-op carries a reason. ``apply.py`` executes the changes in the order they are listed here.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kafka_asg.config import (
    CLUSTER_TAG,
    PER_INSTANCE_DEVICES,
    VOLUME_ROLES,
    ClusterConfig,
    config_to_document,
)
from kafka_asg.fsutil import sha256_file
from kafka_asg.provision.inputs import ProvisionInputs

Action = Literal["create", "update", "replace", "delete"]
# (protocol, from_port, to_port, source kind, source); source "self" is the group itself.
Rule = tuple[str, int, int, Literal["cidr", "sg"], str]

POLICY_NAME = "kafka-asg-agent"
MANIFEST_KEY = "manifest.json"
CLUSTER_DOC_KEY = "cluster.json"
SHA_METADATA = "sha256"  # S3 user metadata key (x-amz-meta-sha256): lets a no-op `up` skip PutObject
# Terminate before launch: the replacement must find the slot's ENI and volumes free
# (https://docs.aws.amazon.com/autoscaling/ec2/userguide/ec2-auto-scaling-instance-maintenance-policy.html).
MAINTENANCE_POLICY = {"MinHealthyPercentage": 0, "MaxHealthyPercentage": 100}
# AZRebalance launches before it terminates and moves instances away from their slots' AZs.
SUSPENDED_PROCESSES = frozenset({"AZRebalance"})


# ============================================================================== observed


@dataclass(frozen=True)
class Network:
    """The account's VPC and subnets (never ours to create): subnet CIDR -> subnet id."""

    vpc_id: str
    subnet_ids: Mapping[str, str]


@dataclass(frozen=True)
class SecurityGroupState:
    group_id: str
    rules: frozenset[Rule]


@dataclass(frozen=True)
class EniState:
    eni_id: str
    slot: int
    ip: str
    subnet_id: str
    groups: frozenset[str]
    status: str
    name_tag: str | None


@dataclass(frozen=True)
class VolumeState:
    volume_id: str
    slot: int
    role: str
    az: str
    state: str


@dataclass(frozen=True)
class IamState:
    role_exists: bool
    policy: Mapping[str, Any] | None
    profile_exists: bool
    profile_roles: frozenset[str]


@dataclass(frozen=True)
class BucketState:
    exists: bool
    public_access_blocked: bool
    encrypted: bool
    object_sha256: Mapping[str, str | None]  # key -> the sha256 metadata (None: object without it)


@dataclass(frozen=True)
class LaunchTemplateState:
    template_id: str
    latest_version: int
    latest_description: str


@dataclass(frozen=True)
class AsgState:
    min: int
    desired: int
    max: int
    subnet_ids: frozenset[str]
    launch_template: str | None
    launch_template_version: str | None
    maintenance_policy: Mapping[str, int] | None  # None: the endpoint does not report it (moto)
    suspended: frozenset[str]
    tags: Mapping[str, str]


@dataclass(frozen=True)
class Observed:
    account_id: str
    partition: str
    network: Network
    security_group: SecurityGroupState | None = None
    enis: Mapping[int, EniState] = field(default_factory=dict)
    volumes: Mapping[tuple[int, str], VolumeState] = field(default_factory=dict)
    iam: IamState = IamState(False, None, False, frozenset())
    bucket: BucketState = BucketState(False, False, False, {})
    launch_template: LaunchTemplateState | None = None
    asg: AsgState | None = None


# ============================================================================== desired


@dataclass(frozen=True)
class DesiredObject:
    key: str
    sha256: str
    size: int
    path: Path | None = None  # a local file, or
    body: bytes | None = None  # generated content


@dataclass(frozen=True)
class Desired:
    cfg: ClusterConfig
    rules: frozenset[Rule]
    policy: Mapping[str, Any]
    objects: tuple[DesiredObject, ...]
    user_data_b64: str
    launch_template_digest: str


def _body(key: str, body: bytes) -> DesiredObject:
    return DesiredObject(key=key, sha256=hashlib.sha256(body).hexdigest(), size=len(body), body=body)


def security_group_rules(cfg: ClusterConfig) -> frozenset[Rule]:
    """The seed's rules (ZooKeeper + Kafka from the VPC) plus the same from the group itself; SSH only from
    the bastion group; nothing from 0.0.0.0/0."""
    rules: set[Rule] = set()
    p = cfg.ports
    for port in (p.zk_client, p.zk_quorum, p.zk_election, p.kafka):
        rules.add(("tcp", port, port, "cidr", str(cfg.vpc_cidr)))
        rules.add(("tcp", port, port, "sg", "self"))
    if cfg.bastion_security_group:
        rules.add(("tcp", 22, 22, "sg", cfg.bastion_security_group))
    return frozenset(rules)


def asg_arn(cfg: ClusterConfig, partition: str, account_id: str) -> str:
    return (
        f"arn:{partition}:autoscaling:{cfg.region}:{account_id}:autoScalingGroup:*:autoScalingGroupName/{cfg.asg_name}"
    )


def agent_policy(cfg: ClusterConfig, partition: str, account_id: str) -> dict[str, Any]:
    """Least-privilege inline policy for the node agent (replaces the seed's AmazonEC2FullAccess).

    Conditions follow the Service Authorization Reference for EC2
    (https://docs.aws.amazon.com/service-authorization/latest/reference/list_amazonec2.html): attach actions
    are authorized per resource, so the ENI/volume side requires our cluster tag and the instance side the
    tag Auto Scaling puts on its instances (aws:autoscaling:groupName).
    """
    ec2 = f"arn:{partition}:ec2:{cfg.region}:{account_id}"
    bucket = f"arn:{partition}:s3:::{cfg.bucket}"
    own_instances = {"StringEquals": {"aws:ResourceTag/aws:autoscaling:groupName": cfg.asg_name}}
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "ReadClusterBucket",
                "Effect": "Allow",
                "Action": ["s3:GetBucketLocation", "s3:ListBucket"],
                "Resource": [bucket],
            },
            {"Sid": "ReadClusterObjects", "Effect": "Allow", "Action": ["s3:GetObject"], "Resource": [f"{bucket}/*"]},
            {
                # Describe* calls support no resource-level permissions; they must be on "*".
                "Sid": "DescribeSlots",
                "Effect": "Allow",
                "Action": ["ec2:DescribeInstances", "ec2:DescribeNetworkInterfaces", "ec2:DescribeVolumes"],
                "Resource": ["*"],
            },
            {
                "Sid": "AttachClusterResources",
                "Effect": "Allow",
                "Action": ["ec2:AttachNetworkInterface", "ec2:AttachVolume"],
                "Resource": [f"{ec2}:network-interface/*", f"{ec2}:volume/*"],
                "Condition": {"StringEquals": {f"aws:ResourceTag/{CLUSTER_TAG}": cfg.name}},
            },
            {
                "Sid": "AttachToOwnAsgInstances",
                "Effect": "Allow",
                "Action": ["ec2:AttachNetworkInterface", "ec2:AttachVolume"],
                "Resource": [f"{ec2}:instance/*"],
                "Condition": own_instances,
            },
            {
                # The agent reports its state as kafka-asg:* instance tags, and may set no other tag.
                "Sid": "TagOwnAsgInstances",
                "Effect": "Allow",
                "Action": ["ec2:CreateTags"],
                "Resource": [f"{ec2}:instance/*"],
                "Condition": {**own_instances, "ForAllValues:StringLike": {"aws:TagKeys": ["kafka-asg:*"]}},
            },
            {
                "Sid": "OwnAsgLifecycle",
                "Effect": "Allow",
                "Action": [
                    "autoscaling:CompleteLifecycleAction",
                    "autoscaling:RecordLifecycleActionHeartbeat",
                    "autoscaling:SetInstanceHealth",
                    "autoscaling:SetInstanceProtection",
                ],
                "Resource": [asg_arn(cfg, partition, account_id)],
            },
        ],
    }


ASSUME_ROLE_POLICY = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}],
}


def bucket_objects(cfg: ClusterConfig, inputs: ProvisionInputs) -> tuple[DesiredObject, ...]:
    """Base configs, the inputs' objects, cluster.json, then manifest.json describing all the others."""
    objects: list[DesiredObject] = []
    files = {"zookeeper.config": cfg.zookeeper_config, "kafka.config": cfg.kafka_config, **inputs.objects}
    for key, path in sorted(files.items()):
        sha, size = sha256_file(path), path.stat().st_size
        objects.append(DesiredObject(key=key, sha256=sha, size=size, path=path))
    doc = json.dumps(config_to_document(cfg), indent=2, sort_keys=True).encode()
    objects.append(_body(CLUSTER_DOC_KEY, doc))
    manifest = {"files": {o.key: {"sha256": o.sha256, "size": o.size} for o in objects}}
    objects.append(_body(MANIFEST_KEY, json.dumps(manifest, indent=2, sort_keys=True).encode()))
    return tuple(objects)


def launch_template_data(cfg: ClusterConfig, user_data_b64: str, security_group_id: str) -> dict[str, Any]:
    data: dict[str, Any] = {
        "ImageId": cfg.ami,
        "InstanceType": cfg.instance_type,
        "IamInstanceProfile": {"Name": cfg.instance_profile_name},
        "SecurityGroupIds": [security_group_id],
        # IMDSv2 only; hop limit 1 keeps the token from leaving the instance (containers get none).
        "MetadataOptions": {"HttpTokens": "required", "HttpPutResponseHopLimit": 1, "HttpEndpoint": "enabled"},
        "UserData": user_data_b64,
    }
    if cfg.volumes == "per-instance":
        data["BlockDeviceMappings"] = [
            {
                "DeviceName": device,
                "Ebs": {
                    "VolumeSize": cfg.volume.size_gib,
                    "VolumeType": cfg.volume.volume_type,
                    "Encrypted": cfg.volume.encrypted,
                    "DeleteOnTermination": True,
                },
            }
            for device in PER_INSTANCE_DEVICES.values()
        ]
        data["TagSpecifications"] = [
            {"ResourceType": "volume", "Tags": [{"Key": k, "Value": v} for k, v in sorted(cfg.base_tags().items())]}
        ]
    return data


def desired_state(cfg: ClusterConfig, inputs: ProvisionInputs, *, account_id: str, partition: str) -> Desired:
    user_data_b64 = base64.b64encode(inputs.user_data.encode()).decode()
    # The digest names the group, not its id: a recreated group is handled in diff().
    digest_data = launch_template_data(cfg, user_data_b64, cfg.security_group_name)
    digest = hashlib.sha256(json.dumps(digest_data, sort_keys=True).encode()).hexdigest()
    return Desired(
        cfg=cfg,
        rules=security_group_rules(cfg),
        policy=agent_policy(cfg, partition, account_id),
        objects=bucket_objects(cfg, inputs),
        user_data_b64=user_data_b64,
        launch_template_digest=digest,
    )


def launch_template_description(digest: str) -> str:
    """The version description records the digest of its data, so a no-op plan needs no deep compare."""
    return f"kafka-asg sha256:{digest}"


# ============================================================================== plan


@dataclass(frozen=True)
class Change:
    kind: str
    name: str
    action: Action
    reason: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "action": self.action, "reason": self.reason}


@dataclass(frozen=True)
class NoOp:
    kind: str
    name: str
    reason: str


@dataclass(frozen=True)
class Plan:
    changes: tuple[Change, ...]
    noops: tuple[NoOp, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not self.changes

    def render_text(self) -> str:
        symbols = {"create": "+", "update": "~", "replace": "-/+", "delete": "-"}
        lines = [f"  {symbols[c.action]} {c.kind} {c.name}: {c.reason}" for c in self.changes]
        if self.is_empty:
            lines.append(f"No changes: {len(self.noops)} resources match the config.")
        else:
            counts = {a: sum(1 for c in self.changes if c.action == a) for a in symbols}
            summary = ", ".join(f"{n} to {a}" for a, n in counts.items() if n)
            lines.append(f"Plan: {summary} ({len(self.noops)} unchanged).")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "changes": [c.to_json() for c in self.changes],
            "unchanged": [{"kind": n.kind, "name": n.name, "reason": n.reason} for n in self.noops],
        }


class _Builder:
    def __init__(self) -> None:
        self.changes: list[Change] = []
        self.noops: list[NoOp] = []

    def change(self, kind: str, name: str, action: Action, reason: str, **params: Any) -> None:
        self.changes.append(Change(kind, name, action, reason, params))

    def noop(self, kind: str, name: str, reason: str) -> None:
        self.noops.append(NoOp(kind, name, reason))


def _diff_bucket(b: _Builder, observed: Observed, desired: Desired) -> None:
    cfg = desired.cfg
    bucket = observed.bucket
    if not bucket.exists:
        b.change("bucket", cfg.bucket, "create", "bucket does not exist")
    else:
        b.noop("bucket", cfg.bucket, "exists")
    if not bucket.public_access_blocked or not bucket.encrypted:
        missing = [
            what
            for what, ok in (("public access block", bucket.public_access_blocked), ("encryption", bucket.encrypted))
            if not ok
        ]
        b.change("bucket-settings", cfg.bucket, "update", f"{' and '.join(missing)} not set")
    else:
        b.noop("bucket-settings", cfg.bucket, "public access blocked, default encryption on")
    for obj in desired.objects:
        have = bucket.object_sha256.get(obj.key, "<absent>")
        if have == "<absent>":
            b.change("object", obj.key, "create", f"not in the bucket ({obj.size} bytes)", key=obj.key)
        elif have != obj.sha256:
            b.change(
                "object",
                obj.key,
                "update",
                f"sha256 differs (have {str(have)[:12]}, want {obj.sha256[:12]})",
                key=obj.key,
            )
        else:
            b.noop("object", obj.key, "sha256 matches")


def _diff_security_group(b: _Builder, observed: Observed, desired: Desired) -> None:
    name = desired.cfg.security_group_name
    sg = observed.security_group
    have = sg.rules if sg else frozenset()
    if sg is None:
        b.change("security-group", name, "create", f"no group {name} in {observed.network.vpc_id}")
    else:
        b.noop("security-group", name, f"exists as {sg.group_id}")
    add = sorted(desired.rules - have)
    remove = sorted(have - desired.rules)
    if add:
        b.change("sg-rules", name, "update", f"add {len(add)} ingress rule(s): {_rules_text(add)}", add=add)
    if remove:
        b.change(
            "sg-rules",
            name,
            "update",
            f"revoke {len(remove)} rule(s) not in the config: {_rules_text(remove)}",
            remove=remove,
        )
    if not add and not remove:
        b.noop("sg-rules", name, "ingress rules match")


def _rules_text(rules: list[Rule]) -> str:
    return ", ".join(f"{proto}/{lo}{'' if lo == hi else f'-{hi}'} from {src}" for proto, lo, hi, _, src in rules)


def _diff_iam(b: _Builder, observed: Observed, desired: Desired) -> None:
    cfg = desired.cfg
    iam = observed.iam
    if not iam.role_exists:
        b.change("iam-role", cfg.role_name, "create", "role does not exist")
    else:
        b.noop("iam-role", cfg.role_name, "exists")
    if iam.policy is None:
        b.change("iam-policy", f"{cfg.role_name}/{POLICY_NAME}", "create", "inline policy missing")
    elif _canonical(iam.policy) != _canonical(desired.policy):
        b.change(
            "iam-policy", f"{cfg.role_name}/{POLICY_NAME}", "update", "policy document differs from the generated one"
        )
    else:
        b.noop("iam-policy", f"{cfg.role_name}/{POLICY_NAME}", "document matches")
    if not iam.profile_exists:
        b.change("instance-profile", cfg.instance_profile_name, "create", "instance profile does not exist")
    elif iam.profile_roles != {cfg.role_name}:
        b.change(
            "instance-profile",
            cfg.instance_profile_name,
            "update",
            f"holds roles {sorted(iam.profile_roles)}, want [{cfg.role_name}]",
        )
    else:
        b.noop("instance-profile", cfg.instance_profile_name, f"exists with role {cfg.role_name}")


def _canonical(doc: Mapping[str, Any]) -> str:
    return json.dumps(doc, sort_keys=True)


def _diff_enis(b: _Builder, observed: Observed, desired: Desired, sg_recreated: bool) -> None:
    cfg = desired.cfg
    for slot in cfg.slots:
        name = f"{cfg.eni_name} slot {slot.number}"
        subnet_id = observed.network.subnet_ids[str(slot.subnet.cidr)]
        eni = observed.enis.get(slot.number)
        if eni is None:
            b.change(
                "eni", name, "create", f"no ENI for slot {slot.number} ({slot.ip} in {subnet_id})", slot=slot.number
            )
            continue
        if eni.ip != str(slot.ip) or eni.subnet_id != subnet_id:
            b.change(
                "eni",
                name,
                "replace",
                f"has {eni.ip} in {eni.subnet_id}, want {slot.ip} in {subnet_id}",
                slot=slot.number,
                eni_id=eni.eni_id,
                status=eni.status,
            )
            continue
        reasons = []
        sg = observed.security_group
        if sg_recreated or sg is None or eni.groups != {sg.group_id}:
            reasons.append(f"security groups {sorted(eni.groups)} are not [{cfg.security_group_name}]")
        if eni.name_tag != cfg.eni_name:
            reasons.append(f"Name tag is {eni.name_tag!r}")
        if reasons:
            b.change("eni", name, "update", "; ".join(reasons), slot=slot.number, eni_id=eni.eni_id)
        else:
            b.noop("eni", name, f"{eni.eni_id} has {slot.ip}")


def _diff_volumes(b: _Builder, observed: Observed, desired: Desired) -> None:
    cfg = desired.cfg
    if cfg.volumes != "per-slot":
        if observed.volumes:
            b.noop("volume", "per-slot volumes", f"{len(observed.volumes)} kept (they hold data; down --delete-data)")
        return
    for slot in cfg.slots:
        for role in VOLUME_ROLES:
            name = f"slot {slot.number} {role}"
            vol = observed.volumes.get((slot.number, role))
            if vol is None:
                b.change(
                    "volume",
                    name,
                    "create",
                    f"no {role} volume for slot {slot.number} in {slot.az}",
                    slot=slot.number,
                    role=role,
                )
            elif vol.az != slot.az:
                # Never delete a data volume on our own: the operator moves the data or deletes it.
                b.noop("volume", name, f"{vol.volume_id} is in {vol.az}, not {slot.az}: left alone (holds data)")
            else:
                b.noop("volume", name, f"{vol.volume_id} exists ({vol.state})")


def _diff_launch_template(b: _Builder, observed: Observed, desired: Desired, sg_recreated: bool) -> None:
    name = desired.cfg.launch_template_name
    lt = observed.launch_template
    want = launch_template_description(desired.launch_template_digest)
    if lt is None:
        b.change("launch-template", name, "create", "launch template does not exist")
    elif sg_recreated:
        b.change("launch-template", name, "update", "the security group is recreated: new version with its id")
    elif lt.latest_description != want:
        b.change(
            "launch-template", name, "update", f"version {lt.latest_version} differs from the config (new version)"
        )
    else:
        b.noop("launch-template", name, f"version {lt.latest_version} matches")


def _diff_asg(b: _Builder, observed: Observed, desired: Desired) -> None:
    cfg = desired.cfg
    name = cfg.asg_name
    asg = observed.asg
    want_subnets = frozenset(observed.network.subnet_ids[str(s.cidr)] for s in cfg.subnets)
    if asg is None:
        b.change(
            "asg",
            name,
            "create",
            f"no group; {cfg.asg.min}/{cfg.asg.desired}/{cfg.asg.max} over {len(want_subnets)} subnet(s)",
        )
        b.change("asg-processes", name, "update", "suspend AZRebalance (it moves instances away from their slots)")
        return
    reasons = []
    if (asg.min, asg.desired, asg.max) != (cfg.asg.min, cfg.asg.desired, cfg.asg.max):
        reasons.append(f"size {asg.min}/{asg.desired}/{asg.max}, want {cfg.asg.min}/{cfg.asg.desired}/{cfg.asg.max}")
    if asg.subnet_ids != want_subnets:
        reasons.append(f"subnets {sorted(asg.subnet_ids)}, want {sorted(want_subnets)}")
    if asg.launch_template != cfg.launch_template_name or asg.launch_template_version != "$Latest":
        reasons.append(
            f"launch template {asg.launch_template}:{asg.launch_template_version}, "
            f"want {cfg.launch_template_name}:$Latest"
        )
    if asg.maintenance_policy is not None and dict(asg.maintenance_policy) != MAINTENANCE_POLICY:
        reasons.append(f"maintenance policy {dict(asg.maintenance_policy)}, want terminate-before-launch")
    if reasons:
        b.change("asg", name, "update", "; ".join(reasons))
    else:
        note = "" if asg.maintenance_policy is not None else " (endpoint does not report the maintenance policy)"
        b.noop("asg", name, f"matches{note}")
    if asg.tags.get(CLUSTER_TAG) != cfg.name or any(asg.tags.get(k) != v for k, v in cfg.tags.items()):
        b.change("asg-tags", name, "update", "cluster tags missing")
    if not SUSPENDED_PROCESSES.issubset(asg.suspended):
        b.change("asg-processes", name, "update", "suspend AZRebalance (it moves instances away from their slots)")
    else:
        b.noop("asg-processes", name, "AZRebalance suspended")


def diff(observed: Observed, desired: Desired) -> Plan:
    """Pure: the changes that make ``observed`` equal ``desired``, in dependency order (the order apply runs)."""
    b = _Builder()
    sg_recreated = observed.security_group is None
    _diff_bucket(b, observed, desired)
    _diff_security_group(b, observed, desired)
    _diff_iam(b, observed, desired)
    _diff_enis(b, observed, desired, sg_recreated and bool(observed.enis))
    _diff_volumes(b, observed, desired)
    _diff_launch_template(b, observed, desired, sg_recreated and observed.launch_template is not None)
    _diff_asg(b, observed, desired)
    return Plan(changes=tuple(b.changes), noops=tuple(b.noops))
