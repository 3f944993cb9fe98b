"""Each strict behaviour, on plain moto (False) and strict moto (True): AWS's behaviour holds only when strict.

The ``aws_like`` result is asserted equal to ``strict``, so every test fails on plain moto if it were asked to
behave like AWS, and the pair also notices when a new moto release fixes the gap (then the patch can go).
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws

from kafka_asg.local.strict import (
    GroupMember,
    StrictMoto,
    StrictOptions,
    choose_launch_az,
    choose_scale_in,
)

REGION = "eu-west-1"
AZS = ("eu-west-1a", "eu-west-1b", "eu-west-1c")
SSM_AMI = "resolve:ssm:/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class World:
    ec2: Any
    asg: Any
    subnets: list[str]
    strict: StrictMoto | None
    clock: Clock

    def advance(self, seconds: float) -> None:
        self.clock.now += seconds
        if self.strict is not None:
            self.strict.tick([REGION])


@pytest.fixture(params=[False, True], ids=["plain", "strict"])
def world(request: pytest.FixtureRequest) -> Iterator[World]:
    with make_world(strict=request.param) as w:
        yield w


@contextmanager
def make_world(*, strict: bool) -> Iterator[World]:
    clock = Clock()
    strict_moto = StrictMoto(StrictOptions(boot_delay=2.0, detach_delay=5.0), clock=clock) if strict else None
    with mock_aws():
        if strict_moto is not None:
            strict_moto.install()
        try:
            ec2 = boto3.client("ec2", region_name=REGION)
            vpc = ec2.create_vpc(CidrBlock="10.0.0.0/26")["Vpc"]["VpcId"]
            subnets = [
                ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.0.0.{16 * (i + 1)}/28", AvailabilityZone=az)["Subnet"][
                    "SubnetId"
                ]
                for i, az in enumerate(AZS)
            ]
            yield World(ec2, boto3.client("autoscaling", region_name=REGION), subnets, strict_moto, clock)
        finally:
            if strict_moto is not None:
                strict_moto.uninstall()


def launch(w: World, subnet: int = 0) -> str:
    out = w.ec2.run_instances(ImageId=SSM_AMI, MinCount=1, MaxCount=1, SubnetId=w.subnets[subnet])
    return str(out["Instances"][0]["InstanceId"])


def error_code(call: Any) -> str | None:
    try:
        call()
    except ClientError as exc:
        return str(exc.response["Error"]["Code"])
    return None


def state(w: World, instance_id: str) -> str:
    return str(w.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]["State"]["Name"])


def test_attach_of_in_use_eni_fails_with_in_use(world: World) -> None:
    eni = world.ec2.create_network_interface(SubnetId=world.subnets[0], PrivateIpAddress="10.0.0.21")
    eni_id = eni["NetworkInterface"]["NetworkInterfaceId"]
    a, b = launch(world), launch(world)
    world.ec2.attach_network_interface(NetworkInterfaceId=eni_id, InstanceId=a, DeviceIndex=1)
    code = error_code(
        lambda: world.ec2.attach_network_interface(NetworkInterfaceId=eni_id, InstanceId=b, DeviceIndex=1)
    )
    assert (code == "InvalidNetworkInterface.InUse") is (world.strict is not None)


def test_attach_of_in_use_volume_fails_with_volume_in_use(world: World) -> None:
    vol = world.ec2.create_volume(Size=1, AvailabilityZone=AZS[0])["VolumeId"]
    a, b = launch(world), launch(world)
    world.ec2.attach_volume(VolumeId=vol, InstanceId=a, Device="/dev/sdf")
    code = error_code(lambda: world.ec2.attach_volume(VolumeId=vol, InstanceId=b, Device="/dev/sdf"))
    assert (code == "VolumeInUse") is (world.strict is not None)


def test_a_successful_attach_wakes_the_region_and_a_refused_one_does_not() -> None:
    with make_world(strict=True) as world:
        assert world.strict is not None
        eni = world.ec2.create_network_interface(SubnetId=world.subnets[0], PrivateIpAddress="10.0.0.21")
        eni_id = eni["NetworkInterface"]["NetworkInterfaceId"]
        vol = world.ec2.create_volume(Size=1, AvailabilityZone=AZS[0])["VolumeId"]
        a, b = launch(world), launch(world)
        woken: list[str] = []
        world.strict.on_attach = lambda: woken.append("attach")
        world.ec2.attach_network_interface(NetworkInterfaceId=eni_id, InstanceId=a, DeviceIndex=1)
        world.ec2.attach_volume(VolumeId=vol, InstanceId=a, Device="/dev/sdf")
        assert woken == ["attach", "attach"]
        error_code(lambda: world.ec2.attach_network_interface(NetworkInterfaceId=eni_id, InstanceId=b, DeviceIndex=1))
        error_code(lambda: world.ec2.attach_volume(VolumeId=vol, InstanceId=b, Device="/dev/sdf"))
        assert woken == ["attach", "attach"]


def test_volume_in_another_az_is_refused(world: World) -> None:
    vol = world.ec2.create_volume(Size=1, AvailabilityZone=AZS[1])["VolumeId"]
    a = launch(world, subnet=0)
    code = error_code(lambda: world.ec2.attach_volume(VolumeId=vol, InstanceId=a, Device="/dev/sdf"))
    assert (code == "InvalidVolume.ZoneMismatch") is (world.strict is not None)


def test_detach_volume_without_instance_id_detaches_from_the_holder(world: World) -> None:
    vol = world.ec2.create_volume(Size=1, AvailabilityZone=AZS[0])["VolumeId"]
    world.ec2.attach_volume(VolumeId=vol, InstanceId=launch(world), Device="/dev/sdf")
    try:
        world.ec2.detach_volume(VolumeId=vol)
        detached = True
    except Exception:  # plain moto: a TypeError in-process, a 500 from its server
        detached = False
    aws_like = detached and world.ec2.describe_volumes(VolumeIds=[vol])["Volumes"][0]["State"] == "available"
    assert aws_like is (world.strict is not None)


def test_instance_ip_never_takes_an_eni_address_nor_a_reserved_one(world: World) -> None:
    # The first address moto would hand out in 10.0.0.16/28 is .20; an ENI holds it.
    world.ec2.create_network_interface(SubnetId=world.subnets[0], PrivateIpAddress="10.0.0.20")
    ips = set()
    for _ in range(5):
        out = world.ec2.run_instances(ImageId=SSM_AMI, MinCount=1, MaxCount=1, SubnetId=world.subnets[0])
        ips.add(out["Instances"][0]["PrivateIpAddress"])
    reserved = {"10.0.0.16", "10.0.0.17", "10.0.0.18", "10.0.0.19", "10.0.0.31"}
    aws_like = not (ips & (reserved | {"10.0.0.20"}))
    assert aws_like is (world.strict is not None)


def test_instances_go_pending_then_running_after_the_delay(world: World) -> None:
    a = launch(world)
    first = state(world, a)
    world.advance(2.5)
    assert state(world, a) == "running"
    assert (first == "pending") is (world.strict is not None)


def test_terminate_detaches_surviving_enis_and_volumes_after_the_delay(world: World) -> None:
    eni_id = world.ec2.create_network_interface(SubnetId=world.subnets[0], PrivateIpAddress="10.0.0.21")[
        "NetworkInterface"
    ]["NetworkInterfaceId"]
    vol = world.ec2.create_volume(Size=1, AvailabilityZone=AZS[0])["VolumeId"]
    a = launch(world)
    world.advance(3)
    world.ec2.attach_network_interface(NetworkInterfaceId=eni_id, InstanceId=a, DeviceIndex=1)
    world.ec2.attach_volume(VolumeId=vol, InstanceId=a, Device="/dev/sdf")
    world.ec2.terminate_instances(InstanceIds=[a])

    def eni() -> dict[str, Any]:
        return dict(world.ec2.describe_network_interfaces(NetworkInterfaceIds=[eni_id])["NetworkInterfaces"][0])

    def vol_state() -> str:
        return str(world.ec2.describe_volumes(VolumeIds=[vol])["Volumes"][0]["State"])

    during = (eni()["Status"], eni().get("Attachment", {}).get("Status"), vol_state(), state(world, a))
    world.advance(6)
    after = (eni()["Status"], vol_state(), state(world, a))
    # Plain moto: volumes free at once, the ENI stays in-use for ever, the instance is terminated at once.
    aws_like = during == ("in-use", "detaching", "in-use", "shutting-down") and after == (
        "available",
        "available",
        "terminated",
    )
    assert aws_like is (world.strict is not None)


def make_group(w: World, desired: int, user_data: bytes = b"#!/bin/sh\ntrue\n") -> None:
    w.ec2.create_launch_template(
        LaunchTemplateName="kafka-lt",
        LaunchTemplateData={
            "ImageId": SSM_AMI,
            "UserData": base64.b64encode(user_data).decode(),
            "MetadataOptions": {"HttpTokens": "required"},
        },
    )
    w.asg.create_auto_scaling_group(
        AutoScalingGroupName="kafka-asg",
        LaunchTemplate={"LaunchTemplateName": "kafka-lt", "Version": "$Latest"},
        MinSize=0,
        MaxSize=4,
        DesiredCapacity=desired,
        VPCZoneIdentifier=",".join(w.subnets),
    )


def group_instances(w: World) -> list[dict[str, Any]]:
    out = w.asg.describe_auto_scaling_groups(AutoScalingGroupNames=["kafka-asg"])["AutoScalingGroups"][0]
    return list(out["Instances"])


def test_asg_spreads_over_the_azs_of_its_subnets(world: World) -> None:
    make_group(world, 3)
    azs = sorted(i["AvailabilityZone"] for i in group_instances(world))
    assert (azs == list(AZS)) is (world.strict is not None)


def test_asg_accepts_the_ssm_ami_alias_and_template_metadata_options(world: World) -> None:
    make_group(world, 1)
    iid = group_instances(world)[0]["InstanceId"]
    inst = world.ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]
    assert inst["ImageId"] == SSM_AMI  # moto accepts the alias either way
    assert (inst["MetadataOptions"]["HttpTokens"] == "required") is (world.strict is not None)


def test_an_instance_launches_from_a_new_template_version_with_its_user_data() -> None:
    # `kafka-asg up` with new user data makes a new launch template version; plain moto cannot launch from it.
    with make_world(strict=True) as w:
        make_group(w, 0)
        w.ec2.create_launch_template_version(
            LaunchTemplateName="kafka-lt",
            SourceVersion="1",
            LaunchTemplateData={"UserData": base64.b64encode(b"#!/bin/sh\necho v2\n").decode()},
        )
        w.asg.set_desired_capacity(AutoScalingGroupName="kafka-asg", DesiredCapacity=1)
        iid = group_instances(w)[0]["InstanceId"]
        user_data = w.ec2.describe_instance_attribute(InstanceId=iid, Attribute="userData")["UserData"]["Value"]
        assert base64.b64decode(user_data) == b"#!/bin/sh\necho v2\n"


def test_asg_replaces_terminated_and_unhealthy_instances_in_the_same_az(world: World) -> None:
    make_group(world, 3)
    world.advance(3)
    members = {i["InstanceId"]: i["AvailabilityZone"] for i in group_instances(world)}
    dead, sick = sorted(members)[:2]
    world.ec2.terminate_instances(InstanceIds=[dead])
    world.asg.set_instance_health(InstanceId=sick, HealthStatus="Unhealthy")
    world.advance(0.1)
    now = {i["InstanceId"]: i["AvailabilityZone"] for i in group_instances(world)}
    aws_like = (
        len(now) == 3 and dead not in now and sick not in now and sorted(now.values()) == sorted(members.values())
    )
    assert aws_like is (world.strict is not None)


def test_scale_in_never_picks_a_protected_instance(world: World) -> None:
    make_group(world, 3)
    members = [i["InstanceId"] for i in group_instances(world)]
    # Protect the two instances plain moto would pick first (its list order).
    world.asg.set_instance_protection(
        InstanceIds=members[:2], AutoScalingGroupName="kafka-asg", ProtectedFromScaleIn=True
    )
    world.asg.set_desired_capacity(AutoScalingGroupName="kafka-asg", DesiredCapacity=2)
    left = {i["InstanceId"] for i in group_instances(world)}
    assert set(members[:2]) <= left
    assert members[2] not in left


def test_no_launch_into_a_down_az() -> None:
    assert choose_launch_az(AZS, {"eu-west-1a": 0, "eu-west-1b": 1}, down={"eu-west-1a"}) == "eu-west-1c"
    assert choose_launch_az(AZS, {}, down=set(AZS)) is None
    assert choose_launch_az(AZS, {"eu-west-1a": 1, "eu-west-1b": 1, "eu-west-1c": 1}) == "eu-west-1a"


def test_choose_scale_in_prefers_the_fullest_az_and_skips_protected() -> None:
    members = [
        GroupMember("i-1", "a", protected=False, launched_at=1),
        GroupMember("i-2", "a", protected=True, launched_at=2),
        GroupMember("i-3", "b", protected=False, launched_at=3),
    ]
    assert choose_scale_in(members, 1) == ["i-1"]
    assert choose_scale_in(members, 3) == ["i-1", "i-3"]


def test_force_delete_terminates_every_instance_even_protected(world: World) -> None:
    make_group(world, 3)
    members = [i["InstanceId"] for i in group_instances(world)]
    world.asg.set_instance_protection(InstanceIds=members, AutoScalingGroupName="kafka-asg", ProtectedFromScaleIn=True)
    world.asg.delete_auto_scaling_group(AutoScalingGroupName="kafka-asg", ForceDelete=True)
    world.advance(6)  # past the detach delay
    gone = {state(world, i) for i in members} <= {"shutting-down", "terminated"}
    assert gone is (world.strict is not None)
