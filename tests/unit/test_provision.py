"""Provisioning against moto in-process: the idempotency protocol, drift, down, and the IAM policy."""

from __future__ import annotations

import argparse
import base64
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions
import pytest
from moto import mock_aws

from kafka_asg.config import CLUSTER_TAG, ROLE_TAG, SLOT_TAG, ClusterConfig, seed_config
from kafka_asg.errors import ConfigError, Unavailable
from kafka_asg.provision import apply as apply_mod
from kafka_asg.provision import commands as prov_commands
from kafka_asg.provision.apply import down, plan, up
from kafka_asg.provision.clients import AwsClients, aws_clients
from kafka_asg.provision.inputs import ProvisionInputs
from kafka_asg.provision.plan import MANIFEST_KEY, agent_policy

REGION = "eu-west-1"


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("AWS_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    # Never wait for real in unit tests.
    monkeypatch.setattr(apply_mod, "POLL_SECONDS", 0.01)


def make_account(cfg: ClusterConfig) -> str:
    """The account's own VPC and subnets (kafka-asg never creates them)."""
    ec2 = boto3.client("ec2", region_name=cfg.region)
    vpc_id = ec2.create_vpc(CidrBlock=str(cfg.vpc_cidr))["Vpc"]["VpcId"]
    for subnet in cfg.subnets:
        ec2.create_subnet(VpcId=vpc_id, CidrBlock=str(subnet.cidr), AvailabilityZone=subnet.az)
    return vpc_id


@pytest.fixture
def inputs(tmp_path: Path) -> ProvisionInputs:
    archive = tmp_path / "kafka.tgz"
    archive.write_bytes(b"kafka" * 1000)
    agent = tmp_path / "agent.pyz"
    agent.write_bytes(b"placeholder agent")
    return ProvisionInputs(
        user_data="#!/bin/sh\necho boot\n",
        objects={"archives/kafka_2.13-3.9.2.tgz": archive, "agent/kafka-asg-agent.pyz": agent},
    )


@pytest.fixture
def cfg() -> ClusterConfig:
    return seed_config()


@pytest.fixture
def clients(cfg: ClusterConfig) -> Iterator[AwsClients]:
    with mock_aws():
        make_account(cfg)
        yield aws_clients(cfg)


def quiet(_: str) -> None:
    pass


def test_idempotency_protocol(cfg: ClusterConfig, clients: AwsClients, inputs: ProvisionInputs) -> None:
    first = plan(cfg, clients, inputs)
    assert not first.is_empty
    assert all(c.reason for c in first.changes)
    kinds = [c.kind for c in first.changes]
    # dependency order: bucket before objects, group before ENIs, role before profile, template before ASG
    assert kinds.index("bucket") < kinds.index("object")
    assert kinds.index("security-group") < kinds.index("eni")
    assert kinds.index("iam-role") < kinds.index("instance-profile") < kinds.index("launch-template")
    assert kinds.index("launch-template") < kinds.index("asg")

    applied = up(cfg, clients, inputs, quiet)
    assert applied.changes == first.changes

    again = plan(cfg, clients, inputs)
    assert again.is_empty, again.render_text()
    assert all(n.reason for n in again.noops)

    clients.counter.reset()
    assert up(cfg, clients, inputs, quiet).is_empty
    assert clients.counter.mutating == {}
    assert clients.counter.total > 0  # it did look

    down(cfg, clients, delete_data=False, progress=quiet)
    clients.counter.reset()
    down(cfg, clients, delete_data=False, progress=quiet)  # second run: no error, nothing to delete
    assert clients.counter.mutating == {}


def test_cmd_plan_detailed_exitcode(
    cfg: ClusterConfig, clients: AwsClients, inputs: ProvisionInputs, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prov_commands, "_inputs", lambda _cfg: inputs)
    args = argparse.Namespace(config=None, local=True, detailed_exitcode=True, json=True)
    monkeypatch.setattr(prov_commands, "local_endpoint", lambda: None)
    assert prov_commands.cmd_plan(args) == 2
    up(cfg, clients, inputs, quiet)
    assert prov_commands.cmd_plan(args) == 0


def test_plan_on_invalid_config_makes_no_aws_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(*a: Any, **k: Any) -> Any:
        raise AssertionError("no AWS call on an invalid config")

    monkeypatch.setattr(boto3.session, "Session", explode)
    bad = tmp_path / "cluster.toml"
    bad.write_text('name = "x"\n')
    args = argparse.Namespace(config=str(bad), local=False, detailed_exitcode=True, json=False)
    with pytest.raises(ConfigError):
        prov_commands.cmd_plan(args)


def test_resources_as_specified(cfg: ClusterConfig, clients: AwsClients, inputs: ProvisionInputs) -> None:
    up(cfg, clients, inputs, quiet)
    ec2, s3, asg, iam = clients.ec2, clients.s3, clients.autoscaling, clients.iam

    group = ec2.describe_security_groups(Filters=[{"Name": "group-name", "Values": ["event-servers-sg"]}])[
        "SecurityGroups"
    ][0]
    ranges = {(p["FromPort"], r["CidrIp"]) for p in group["IpPermissions"] for r in p.get("IpRanges", [])}
    assert ranges == {(port, "10.0.0.0/26") for port in (2181, 2888, 3888, 9095)}
    selfs = {p["FromPort"] for p in group["IpPermissions"] for g in p.get("UserIdGroupPairs", [])}
    assert selfs == {2181, 2888, 3888, 9095}  # no 22 without a bastion group

    enis = ec2.describe_network_interfaces(Filters=[{"Name": f"tag:{CLUSTER_TAG}", "Values": ["event-servers"]}])[
        "NetworkInterfaces"
    ]
    by_slot = {next(t["Value"] for t in e["TagSet"] if t["Key"] == SLOT_TAG): e for e in enis}
    assert {k: v["PrivateIpAddress"] for k, v in by_slot.items()} == {
        "1": "10.0.0.53",
        "2": "10.0.0.21",
        "3": "10.0.0.37",
    }
    for eni in enis:
        assert {"Key": "Name", "Value": "event-servers-eni"} in eni["TagSet"]
        assert [g["GroupId"] for g in eni["Groups"]] == [group["GroupId"]]

    volumes = ec2.describe_volumes(Filters=[{"Name": f"tag:{CLUSTER_TAG}", "Values": ["event-servers"]}])["Volumes"]
    assert len(volumes) == 9
    for vol in volumes:
        tags = {t["Key"]: t["Value"] for t in vol["Tags"]}
        assert vol["VolumeType"] == "gp3" and vol["Encrypted"]
        assert vol["AvailabilityZone"] == cfg.slot(int(tags[SLOT_TAG])).az
        assert tags[ROLE_TAG] in ("zk-data", "zk-txlog", "kafka-log")

    assert all(s3.get_public_access_block(Bucket=cfg.bucket)["PublicAccessBlockConfiguration"].values())
    assert s3.get_bucket_encryption(Bucket=cfg.bucket)["ServerSideEncryptionConfiguration"]["Rules"]
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=cfg.bucket)["Contents"]}
    assert keys == {
        "zookeeper.config",
        "kafka.config",
        "cluster.json",
        "manifest.json",
        "archives/kafka_2.13-3.9.2.tgz",
        "agent/kafka-asg-agent.pyz",
    }
    manifest = json.loads(s3.get_object(Bucket=cfg.bucket, Key=MANIFEST_KEY)["Body"].read())
    assert set(manifest["files"]) == keys - {MANIFEST_KEY}
    zk = s3.get_object(Bucket=cfg.bucket, Key="zookeeper.config")["Body"].read()
    assert zk == cfg.zookeeper_config.read_bytes()

    lt = ec2.describe_launch_template_versions(
        LaunchTemplateName="event-servers-launch-template", Versions=["$Latest"]
    )["LaunchTemplateVersions"][0]["LaunchTemplateData"]
    assert lt["MetadataOptions"]["HttpTokens"] == "required"
    assert lt["MetadataOptions"]["HttpPutResponseHopLimit"] == 1
    assert base64.b64decode(lt["UserData"]).decode() == inputs.user_data
    assert lt["IamInstanceProfile"]["Name"] == "event-servers-profile"
    assert "BlockDeviceMappings" not in lt  # per-slot mode: data volumes are the slot's, not the instance's

    group_asg = asg.describe_auto_scaling_groups(AutoScalingGroupNames=["event-servers-asg"])["AutoScalingGroups"][0]
    assert (group_asg["MinSize"], group_asg["DesiredCapacity"], group_asg["MaxSize"]) == (2, 3, 4)
    assert len(group_asg["VPCZoneIdentifier"].split(",")) == 3
    assert {p["ProcessName"] for p in group_asg["SuspendedProcesses"]} == {"AZRebalance"}

    assert iam.list_attached_role_policies(RoleName="event-servers-role")["AttachedPolicies"] == []
    profile = iam.get_instance_profile(InstanceProfileName="event-servers-profile")["InstanceProfile"]
    assert [r["RoleName"] for r in profile["Roles"]] == ["event-servers-role"]


def _statements(policy: dict[str, Any]) -> list[dict[str, Any]]:
    return list(policy["Statement"])


def _actions(statement: dict[str, Any]) -> list[str]:
    action = statement["Action"]
    return [action] if isinstance(action, str) else list(action)


def check_policy(policy: dict[str, Any], cfg: ClusterConfig) -> None:
    """No wildcard EC2 actions; attach actions carry the cluster (or own-ASG) tag condition."""
    for statement in _statements(policy):
        assert statement["Effect"] == "Allow"
        for action in _actions(statement):
            assert "*" not in action, f"wildcard action {action}"
            if action.startswith("ec2:") and not action.startswith("ec2:Describe"):
                cond = statement.get("Condition", {})
                equals = cond.get("StringEquals", {})
                assert (
                    equals.get(f"aws:ResourceTag/{CLUSTER_TAG}") == cfg.name
                    or equals.get("aws:ResourceTag/aws:autoscaling:groupName") == cfg.asg_name
                ), f"{action} without a tag condition"
            if action.startswith("ec2:Describe"):
                assert action in ("ec2:DescribeInstances", "ec2:DescribeNetworkInterfaces", "ec2:DescribeVolumes")
            if action.startswith("autoscaling:"):
                assert statement["Resource"] == [
                    f"arn:aws:autoscaling:{cfg.region}:123456789012:autoScalingGroup:*:autoScalingGroupName/{cfg.asg_name}"
                ]
            if action.startswith("s3:"):
                assert all(r.startswith(f"arn:aws:s3:::{cfg.bucket}") for r in statement["Resource"])
    attach = [s for s in _statements(policy) if "ec2:AttachNetworkInterface" in _actions(s)]
    resources = {r.rsplit(":", 1)[1] for s in attach for r in s["Resource"]}
    assert resources == {"network-interface/*", "volume/*", "instance/*"}
    tagging = [s for s in _statements(policy) if "ec2:CreateTags" in _actions(s)]
    assert tagging[0]["Condition"]["ForAllValues:StringLike"] == {"aws:TagKeys": ["kafka-asg:*"]}


def test_generated_policy_is_least_privilege(cfg: ClusterConfig) -> None:
    check_policy(agent_policy(cfg, "aws", "123456789012"), cfg)


def test_policy_in_iam_parses_and_is_least_privilege(
    cfg: ClusterConfig, clients: AwsClients, inputs: ProvisionInputs
) -> None:
    up(cfg, clients, inputs, quiet)
    doc = clients.iam.get_role_policy(RoleName=cfg.role_name, PolicyName="kafka-asg-agent")["PolicyDocument"]
    policy = json.loads(doc) if isinstance(doc, str) else dict(doc)
    check_policy(policy, cfg)


def test_per_slot_volumes_survive_down_and_go_with_delete_data(
    cfg: ClusterConfig, clients: AwsClients, inputs: ProvisionInputs
) -> None:
    def slot_volumes() -> set[str]:
        found = clients.ec2.describe_volumes(Filters=[{"Name": f"tag:{CLUSTER_TAG}", "Values": [cfg.name]}])
        return {v["VolumeId"] for v in found["Volumes"]}

    up(cfg, clients, inputs, quiet)
    before = slot_volumes()
    down(cfg, clients, delete_data=False, progress=quiet)
    after = slot_volumes()
    assert len(before) == 9 and after == before
    # up again reuses the kept volumes: no volume change in the plan
    assert not [c for c in plan(cfg, clients, inputs).changes if c.kind == "volume"]
    up(cfg, clients, inputs, quiet)
    assert slot_volumes() == before
    down(cfg, clients, delete_data=True, progress=quiet)
    assert slot_volumes() == set()
    enis = clients.ec2.describe_network_interfaces(Filters=[{"Name": f"tag:{CLUSTER_TAG}", "Values": [cfg.name]}])
    assert enis["NetworkInterfaces"] == []
    assert clients.s3.list_buckets()["Buckets"] == []
    vpcs = clients.ec2.describe_vpcs(Filters=[{"Name": "cidr", "Values": ["10.0.0.0/26"]}])["Vpcs"]
    assert len(vpcs) == 1  # the account's VPC is never deleted


def test_per_instance_mode(cfg: ClusterConfig, clients: AwsClients, inputs: ProvisionInputs) -> None:
    cfg = replace(cfg, volumes="per-instance")
    up(cfg, clients, inputs, quiet)
    assert clients.ec2.describe_volumes(Filters=[{"Name": "tag-key", "Values": [SLOT_TAG]}])["Volumes"] == []
    lt = clients.ec2.describe_launch_template_versions(
        LaunchTemplateName=cfg.launch_template_name, Versions=["$Latest"]
    )["LaunchTemplateVersions"][0]["LaunchTemplateData"]
    assert [m["DeviceName"] for m in lt["BlockDeviceMappings"]] == ["/dev/sdb", "/dev/sdc", "/dev/sdd"]
    assert plan(cfg, clients, inputs).is_empty


def test_drift_is_planned_with_reasons_and_repaired(
    cfg: ClusterConfig, clients: AwsClients, inputs: ProvisionInputs
) -> None:
    up(cfg, clients, inputs, quiet)
    ec2 = clients.ec2
    gid = ec2.describe_security_groups(Filters=[{"Name": "group-name", "Values": [cfg.security_group_name]}])[
        "SecurityGroups"
    ][0]["GroupId"]
    ec2.authorize_security_group_ingress(
        GroupId=gid,
        IpPermissions=[{"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}],
    )
    clients.autoscaling.update_auto_scaling_group(AutoScalingGroupName=cfg.asg_name, MaxSize=9)
    clients.s3.delete_object(Bucket=cfg.bucket, Key="kafka.config")
    new_inputs = replace(inputs, user_data="#!/bin/sh\necho v2\n")

    drift = plan(cfg, clients, new_inputs)
    reasons = {(c.kind, c.name): c.reason for c in drift.changes}
    assert "0.0.0.0/0" in reasons[("sg-rules", cfg.security_group_name)]
    assert "size 2/3/9, want 2/3/4" in reasons[("asg", cfg.asg_name)]
    assert reasons[("object", "kafka.config")].startswith("not in the bucket")
    assert "differs from the config" in reasons[("launch-template", cfg.launch_template_name)]
    # cluster.json and manifest do not change: the object set did not
    assert ("object", MANIFEST_KEY) not in reasons

    up(cfg, clients, new_inputs, quiet)
    assert plan(cfg, clients, new_inputs).is_empty
    versions = ec2.describe_launch_template_versions(LaunchTemplateName=cfg.launch_template_name)[
        "LaunchTemplateVersions"
    ]
    assert len(versions) == 2


def test_bastion_opens_ssh_only_from_its_group(
    cfg: ClusterConfig, clients: AwsClients, inputs: ProvisionInputs
) -> None:
    vpc_id = clients.ec2.describe_vpcs()["Vpcs"][-1]["VpcId"]
    bastion = clients.ec2.create_security_group(GroupName="bastion", Description="b", VpcId=vpc_id)["GroupId"]
    cfg = replace(cfg, bastion_security_group=bastion)
    up(cfg, clients, inputs, quiet)
    group = clients.ec2.describe_security_groups(Filters=[{"Name": "group-name", "Values": [cfg.security_group_name]}])[
        "SecurityGroups"
    ][0]
    ssh = [p for p in group["IpPermissions"] if p["FromPort"] == 22]
    assert len(ssh) == 1 and ssh[0].get("IpRanges", []) == []
    assert [g["GroupId"] for g in ssh[0]["UserIdGroupPairs"]] == [bastion]
    assert plan(cfg, clients, inputs).is_empty


def test_interrupted_up_resumes(
    cfg: ClusterConfig, clients: AwsClients, inputs: ProvisionInputs, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = apply_mod._EXECUTORS["eni"]
    calls = {"n": 0}

    def flaky(ctx: Any, change: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        real(ctx, change)

    monkeypatch.setitem(apply_mod._EXECUTORS, "eni", flaky)
    with pytest.raises(KeyboardInterrupt):
        up(cfg, clients, inputs, quiet)
    monkeypatch.setitem(apply_mod._EXECUTORS, "eni", real)
    resumed = up(cfg, clients, inputs, quiet)
    assert [c.kind for c in resumed.changes].count("eni") == 2
    assert [c.kind for c in resumed.changes].count("bucket") == 0
    assert plan(cfg, clients, inputs).is_empty


def test_down_waits_bounded_for_an_attached_eni(
    cfg: ClusterConfig, clients: AwsClients, inputs: ProvisionInputs
) -> None:
    up(cfg, clients, inputs, quiet)
    ec2 = clients.ec2
    subnet = ec2.describe_subnets(Filters=[{"Name": "cidr-block", "Values": ["10.0.0.48/28"]}])["Subnets"][0]
    instance = ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1, SubnetId=subnet["SubnetId"])[
        "Instances"
    ][0]["InstanceId"]
    eni = ec2.describe_network_interfaces(Filters=[{"Name": "private-ip-address", "Values": ["10.0.0.53"]}])[
        "NetworkInterfaces"
    ][0]
    attachment = ec2.attach_network_interface(
        NetworkInterfaceId=eni["NetworkInterfaceId"], InstanceId=instance, DeviceIndex=1
    )["AttachmentId"]
    with pytest.raises(Unavailable, match="slot ENIs to become available"):
        down(cfg, clients, delete_data=False, progress=quiet, wait_seconds=0.05)
    ec2.detach_network_interface(AttachmentId=attachment)
    down(cfg, clients, delete_data=False, progress=quiet, wait_seconds=5)
    assert (
        ec2.describe_network_interfaces(Filters=[{"Name": f"tag:{CLUSTER_TAG}", "Values": [cfg.name]}])[
            "NetworkInterfaces"
        ]
        == []
    )


def test_missing_vpc_is_a_clear_error(cfg: ClusterConfig, inputs: ProvisionInputs) -> None:
    with mock_aws():
        clients = aws_clients(cfg)
        with pytest.raises(ConfigError, match=r"no VPC with CIDR 10.0.0.0/26 .*kafka-asg never does"):
            plan(cfg, clients, inputs)
        assert clients.counter.mutating == {}


def test_subnet_in_other_az_is_a_clear_error(cfg: ClusterConfig, inputs: ProvisionInputs) -> None:
    with mock_aws():
        ec2 = boto3.client("ec2", region_name=REGION)
        vpc_id = ec2.create_vpc(CidrBlock="10.0.0.0/26")["Vpc"]["VpcId"]
        ec2.create_subnet(VpcId=vpc_id, CidrBlock="10.0.0.48/28", AvailabilityZone="eu-west-1b")
        ec2.create_subnet(VpcId=vpc_id, CidrBlock="10.0.0.16/28", AvailabilityZone="eu-west-1b")
        with pytest.raises(ConfigError) as info:
            plan(cfg, aws_clients(cfg), inputs)
        text = str(info.value)
        assert "slot 1's IP 10.0.0.53 is in" in text and "eu-west-1b" in text
        assert "no subnet of" in text and "10.0.0.37" in text


def test_region_conflict_is_refused(cfg: ClusterConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    with pytest.raises(ConfigError, match="AWS_REGION is us-east-1"):
        aws_clients(cfg)


def test_parameter_validation_stays_on(cfg: ClusterConfig, clients: AwsClients) -> None:
    for client in (clients.ec2, clients.autoscaling, clients.s3, clients.iam):
        assert getattr(client.meta.config, "parameter_validation", True) is True
    with pytest.raises(botocore.exceptions.ParamValidationError):
        clients.ec2.describe_launch_templates(LaunchTemplateNames=["x"])  # too short: AWS's min length is 3
    assert clients.counter.total == 0  # rejected before it was sent, so not counted


def test_endpoint_url_is_honoured(cfg: ClusterConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    clients = aws_clients(cfg, endpoint_url="http://127.0.0.1:5999")
    assert clients.ec2.meta.endpoint_url == "http://127.0.0.1:5999"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:5998")
    assert aws_clients(cfg).s3.meta.endpoint_url == "http://127.0.0.1:5998"


def test_against_a_moto_server_endpoint(
    cfg: ClusterConfig, inputs: ProvisionInputs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same code over HTTP through AWS_ENDPOINT_URL (as with the local region): path-style S3 for the
    seed's dotted bucket name, and the idempotent second up. Loopback only."""
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        ec2 = boto3.client("ec2", region_name=cfg.region, endpoint_url=endpoint)
        vpc_id = ec2.create_vpc(CidrBlock=str(cfg.vpc_cidr))["Vpc"]["VpcId"]
        for subnet in cfg.subnets:
            ec2.create_subnet(VpcId=vpc_id, CidrBlock=str(subnet.cidr), AvailabilityZone=subnet.az)
        clients = aws_clients(cfg)
        up(cfg, clients, inputs, quiet)
        clients.counter.reset()
        assert up(cfg, clients, inputs, quiet).is_empty
        assert clients.counter.mutating == {}
        assert clients.s3.get_object(Bucket=cfg.bucket, Key="kafka.config")["Body"].read() == (
            cfg.kafka_config.read_bytes()
        )
        down(cfg, clients, delete_data=True, progress=quiet)
        down(cfg, clients, delete_data=True, progress=quiet)
    finally:
        server.stop()
