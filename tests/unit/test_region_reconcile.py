"""The region daemon's reconcile loop over strict moto (in-process) and FakeHosts."""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import partial
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws

from kafka_asg.agent.aws import AwsCloud, Credentials
from kafka_asg.agent.concurrency import at_once
from kafka_asg.config import Subnet
from kafka_asg.local.daemon import (
    Applied,
    Observed,
    ObservedInstance,
    RegionDaemon,
    RegionSpec,
    Step,
    bastion_address,
    batched,
    plan,
    signed_for,
)
from kafka_asg.local.fakehosts import FakeHosts
from kafka_asg.local.hostapi import InstanceSpec, NicSpec
from kafka_asg.local.strict import StrictOptions
from kafka_asg.paths import RegionPaths

REGION = "eu-west-1"
SUBNETS = (
    Subnet("eu-west-1a", IPv4Network("10.0.0.48/28")),
    Subnet("eu-west-1b", IPv4Network("10.0.0.16/28")),
    Subnet("eu-west-1c", IPv4Network("10.0.0.32/28")),
)
USER_DATA = b"#!/bin/sh\necho booted\n"


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Region:
    daemon: RegionDaemon
    hosts: FakeHosts
    ec2: Any
    asg: Any
    clock: Clock
    subnet_ids: dict[str, str]

    def cycle(self, advance: float = 0.0) -> list[str]:
        self.clock.now += advance
        return self.daemon.reconcile_once()


@pytest.fixture
def region(tmp_path: Path) -> Iterator[Region]:
    spec = RegionSpec(
        "event-servers",
        REGION,
        IPv4Network("10.0.0.0/26"),
        SUBNETS,
        port=0,
        options=StrictOptions(boot_delay=1.0, detach_delay=4.0),
    )
    hosts = FakeHosts()
    with mock_aws():
        daemon = RegionDaemon(spec, RegionPaths(tmp_path), hosts)
        clock = Clock()
        daemon.strict.clock = clock
        daemon.strict.install()
        try:
            daemon.create_network()
            hosts.create_vpc(spec.vpc)
            ec2 = boto3.client("ec2", region_name=REGION)
            subnet_ids = {
                s["AvailabilityZone"]: s["SubnetId"]
                for s in ec2.describe_subnets(Filters=[{"Name": "tag:kafka-asg:cluster", "Values": ["event-servers"]}])[
                    "Subnets"
                ]
            }
            yield Region(daemon, hosts, ec2, boto3.client("autoscaling", region_name=REGION), clock, subnet_ids)
        finally:
            daemon.strict.uninstall()


def run(r: Region, az: str = "eu-west-1a") -> str:
    out = r.ec2.run_instances(
        ImageId="ami-local", MinCount=1, MaxCount=1, SubnetId=r.subnet_ids[az], UserData=USER_DATA.decode()
    )
    return str(out["Instances"][0]["InstanceId"])


def test_network_is_created_with_one_subnet_per_az(region: Region) -> None:
    assert set(region.subnet_ids) == {s.az for s in SUBNETS}
    vpcs = region.ec2.describe_vpcs(Filters=[{"Name": "cidr", "Values": ["10.0.0.0/26"]}])["Vpcs"]
    assert len(vpcs) == 1


def test_bastion_address_is_the_first_free_vpc_address() -> None:
    ip, net = bastion_address(IPv4Network("10.0.0.0/26"), [s.cidr for s in SUBNETS])
    assert (ip, net) == (IPv4Address("10.0.0.4"), IPv4Network("10.0.0.0/28"))


def test_running_instance_gets_a_host_and_user_data_once(region: Region) -> None:
    iid = run(region)
    region.cycle()
    assert iid not in region.hosts.hosts  # still pending: no host yet
    region.cycle(advance=1.5)
    host = region.hosts.hosts[iid]
    inst = region.ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]
    assert str(host.spec.primary_ip) == inst["PrivateIpAddress"]
    assert host.spec.mac == inst["NetworkInterfaces"][0]["MacAddress"]
    assert host.spec.subnet == IPv4Network("10.0.0.48/28")
    assert host.user_data_runs == [(USER_DATA, {"AWS_ENDPOINT_URL": "http://10.0.0.1:0"})]
    region.cycle()
    region.cycle()
    assert len(host.user_data_runs) == 1


def test_eni_and_volume_follow_attach_and_detach(region: Region) -> None:
    iid = run(region)
    region.cycle(advance=1.5)
    eni = region.ec2.create_network_interface(SubnetId=region.subnet_ids["eu-west-1a"], PrivateIpAddress="10.0.0.53")
    eni_id = eni["NetworkInterface"]["NetworkInterfaceId"]
    vol = region.ec2.create_volume(Size=2, AvailabilityZone="eu-west-1a")["VolumeId"]
    region.cycle()
    image = region.daemon.paths.volumes_dir / f"{vol}.img"
    assert image.stat().st_size == 2 * 1024**3  # sparse, created at CreateVolume time
    region.ec2.attach_network_interface(NetworkInterfaceId=eni_id, InstanceId=iid, DeviceIndex=1)
    att = region.ec2.attach_volume(VolumeId=vol, InstanceId=iid, Device="/dev/sdf")
    assert att["State"] in ("attaching", "attached")
    region.cycle()
    host = region.hosts.hosts[iid]
    assert host.nics[eni_id] == NicSpec(eni_id, eni["NetworkInterface"]["MacAddress"], 1, IPv4Address("10.0.0.53"))
    assert host.volumes[vol].image == image
    attachment = region.ec2.describe_network_interfaces(NetworkInterfaceIds=[eni_id])["NetworkInterfaces"][0]
    region.ec2.detach_network_interface(AttachmentId=attachment["Attachment"]["AttachmentId"])
    region.ec2.detach_volume(VolumeId=vol)
    region.cycle()
    assert host.nics == {} and host.volumes == {}


def test_an_attach_is_plugged_at_once_not_at_the_next_tick(region: Region) -> None:
    iid = run(region)
    region.cycle(advance=1.5)
    eni = region.ec2.create_network_interface(SubnetId=region.subnet_ids["eu-west-1a"], PrivateIpAddress="10.0.0.53")
    eni_id = eni["NetworkInterface"]["NetworkInterfaceId"]
    region.daemon.spec = replace(region.daemon.spec, loop_interval=600.0)  # the next tick would be 10 min away
    loop = threading.Thread(target=region.daemon.run, daemon=True)
    loop.start()
    try:
        time.sleep(0.2)  # the loop's first cycle, then its long wait
        region.ec2.attach_network_interface(NetworkInterfaceId=eni_id, InstanceId=iid, DeviceIndex=1)
        deadline = time.monotonic() + 10
        while eni_id not in region.hosts.hosts[iid].nics and time.monotonic() < deadline:
            time.sleep(0.01)
        assert eni_id in region.hosts.hosts[iid].nics
    finally:
        region.daemon.stop()
        loop.join(timeout=10)
    assert not loop.is_alive()  # stop() wakes the wait as well


def test_attaches_sent_over_a_few_ms_are_plugged_in_one_batch(region: Region) -> None:
    # A booting agent's three AttachVolume calls arrive a few ms apart: the reconcile the first one wakes waits for
    # the API to go quiet, then plugs all three at once (it plugged the first alone, then the other two).
    from werkzeug.serving import make_server

    iid = run(region)
    region.cycle(advance=1.5)
    volumes = [region.ec2.create_volume(AvailabilityZone="eu-west-1a", Size=1)["VolumeId"] for _ in range(3)]
    region.cycle()  # their images
    server = make_server("127.0.0.1", 0, region.daemon.wsgi_app(admin=False), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    # The agent's own client and its side-by-side calls (a thread and a connection each: they arrive ms apart).
    agent_cloud = AwsCloud(REGION, Credentials("testing", "testing"), f"http://127.0.0.1:{server.server_port}")
    region.daemon.spec = replace(region.daemon.spec, loop_interval=600.0)
    loop = threading.Thread(target=region.daemon.run, daemon=True)
    loop.start()
    try:
        time.sleep(0.2)  # the loop's first cycle, then its long wait
        failures = at_once(
            {v: partial(agent_cloud.attach_volume, v, iid, f"/dev/sd{'fgh'[n]}") for n, v in enumerate(volumes)}
        )
        assert failures == {}
        deadline = time.monotonic() + 10
        while len(region.hosts.hosts[iid].volumes) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        region.daemon.stop()
        loop.join(timeout=10)
        server.shutdown()
        server.server_close()
    assert [(i, sorted(batch)) for i, batch in region.hosts.attach_batches] == [(iid, sorted(volumes))]


def test_terminate_is_a_power_cut_and_the_volume_moves_after_the_delay(region: Region) -> None:
    a, b = run(region), run(region)
    region.cycle(advance=1.5)
    vol = region.ec2.create_volume(Size=1, AvailabilityZone="eu-west-1a")["VolumeId"]
    region.ec2.attach_volume(VolumeId=vol, InstanceId=a, Device="/dev/sdf")
    region.cycle()
    region.ec2.terminate_instances(InstanceIds=[a])
    region.cycle()
    assert a in region.hosts.destroyed and a not in region.hosts.hosts
    # Still in-use until the instance is terminated: the next instance cannot take it yet.
    with pytest.raises(Exception, match="VolumeInUse"):
        region.ec2.attach_volume(VolumeId=vol, InstanceId=b, Device="/dev/sdf")
    region.cycle(advance=4.5)
    region.ec2.attach_volume(VolumeId=vol, InstanceId=b, Device="/dev/sdf")
    region.cycle()
    assert vol in region.hosts.hosts[b].volumes


def test_asg_instances_become_hosts_and_a_killed_one_is_replaced_in_its_az(region: Region) -> None:
    region.ec2.create_launch_template(
        LaunchTemplateName="event-servers-lt",
        LaunchTemplateData={
            "ImageId": "resolve:ssm:/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64",
            "UserData": base64.b64encode(USER_DATA).decode(),
        },
    )
    region.asg.create_auto_scaling_group(
        AutoScalingGroupName="event-servers-asg",
        MinSize=2,
        MaxSize=4,
        DesiredCapacity=3,
        LaunchTemplate={"LaunchTemplateName": "event-servers-lt", "Version": "$Latest"},
        VPCZoneIdentifier=",".join(region.subnet_ids.values()),
    )
    region.cycle(advance=1.5)
    hosts = dict(region.hosts.hosts)
    assert sorted(str(h.spec.subnet) for h in hosts.values()) == sorted(str(s.cidr) for s in SUBNETS)
    victim = next(i for i, h in hosts.items() if h.spec.subnet == IPv4Network("10.0.0.16/28"))
    region.ec2.terminate_instances(InstanceIds=[victim])
    region.cycle()
    region.cycle(advance=1.5)
    assert victim not in region.hosts.hosts
    assert sorted(str(h.spec.subnet) for h in region.hosts.hosts.values()) == sorted(str(s.cidr) for s in SUBNETS)


def test_az_down_partitions_its_instances_and_stops_launches(region: Region) -> None:
    iid = run(region, "eu-west-1b")
    region.cycle(advance=1.5)
    region.daemon.fault("az-down", "eu-west-1b")
    assert region.hosts.hosts[iid].partitioned
    assert "eu-west-1b" in region.daemon.strict.down_azs
    region.daemon.fault("az-up", "eu-west-1b")
    assert not region.hosts.hosts[iid].partitioned


def test_instances_outside_the_rehearsal_vpc_never_become_hosts(region: Region) -> None:
    default_subnet = region.ec2.describe_subnets(Filters=[{"Name": "default-for-az", "Values": ["true"]}])["Subnets"][0]
    region.ec2.run_instances(ImageId="ami-local", MinCount=1, MaxCount=1, SubnetId=default_subnet["SubnetId"])
    region.cycle(advance=1.5)
    assert region.hosts.hosts == {}


def test_imds_source_answers_by_primary_ip_and_by_eni_ip(region: Region) -> None:
    iid = run(region)
    region.cycle(advance=1.5)
    eni_id = region.ec2.create_network_interface(
        SubnetId=region.subnet_ids["eu-west-1a"], PrivateIpAddress="10.0.0.53"
    )["NetworkInterface"]["NetworkInterfaceId"]
    region.ec2.attach_network_interface(NetworkInterfaceId=eni_id, InstanceId=iid, DeviceIndex=1)
    view = region.daemon.imds_source(IPv4Address("10.0.0.53"))
    assert view is not None and view.instance_id == iid
    assert [n.device_number for n in view.nics] == [0, 1]
    assert view.az_id.startswith("euw1-az")
    assert region.daemon.imds_source(IPv4Address("10.0.0.60")) is None


def test_imds_looks_an_instance_up_once_until_an_api_call_or_a_tick(region: Region) -> None:
    from werkzeug.serving import make_server

    iid = run(region)
    region.cycle(advance=1.5)
    primary = IPv4Address(
        region.ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]["PrivateIpAddress"]
    )
    first = region.daemon.imds_source(primary)
    assert first is not None and [n.device_number for n in first.nics] == [0]
    assert region.daemon.imds_source(primary) is first  # an agent's identity, nine reads side by side: one lookup
    region.cycle()
    assert region.daemon.imds_source(primary) is not first
    server = make_server("127.0.0.1", 0, region.daemon.wsgi_app(admin=False), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        served = boto3.client(
            "ec2", region_name=REGION, endpoint_url=f"http://127.0.0.1:{server.server_port}",
            aws_access_key_id="testing", aws_secret_access_key="testing",
        )  # fmt: skip
        eni_id = served.create_network_interface(SubnetId=region.subnet_ids["eu-west-1a"], PrivateIpAddress="10.0.0.53")
        served.attach_network_interface(
            NetworkInterfaceId=eni_id["NetworkInterface"]["NetworkInterfaceId"], InstanceId=iid, DeviceIndex=1
        )
    finally:
        server.shutdown()
        server.server_close()
    after = region.daemon.imds_source(primary)
    assert after is not None and [n.device_number for n in after.nics] == [0, 1]  # the attach is seen at once


def test_plan_removes_before_it_adds() -> None:
    spec = InstanceSpec("i-new", IPv4Address("10.0.0.20"), "02:00:00:00:00:01", IPv4Network("10.0.0.16/28"))
    observed = Observed(instances=(ObservedInstance(spec, "running", None, "eu-west-1b"),))
    applied = Applied(hosts=frozenset({"i-old"}), volumes=frozenset({("i-old", "vol-1")}))
    assert [s.describe() for s in plan(observed, applied)] == ["destroy i-old", "detach i-old vol-1", "create i-new"]


def test_served_api_and_admin_endpoint_on_loopback(region: Region) -> None:
    # Start only the operator-facing app over werkzeug on 127.0.0.1 and call the admin path.
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, region.daemon.wsgi_app(admin=True), threaded=True)
    import threading

    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        req = urllib.request.Request(
            f"http://127.0.0.1:{server.server_port}/_kafka_asg/fault",
            data=json.dumps({"action": "az-down", "target": "eu-west-1c"}).encode(),
            method="POST",
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(req, timeout=5) as resp:
            assert json.loads(resp.read())["ok"] is True
        assert region.daemon.strict.down_azs == {"eu-west-1c"}
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("authorization", "service"),
    [
        ("AWS4-HMAC-SHA256 Credential=AKID/20261126/eu-west-1/s3/aws4_request, SignedHeaders=host, Signature=ab", "s3"),
        (
            "AWS4-HMAC-SHA256 Credential=AKID/20261126/eu-west-1/ec2/aws4_request, SignedHeaders=host, Signature=ab",
            "ec2",
        ),
        ("", None),
        ("AWS AKID:signature-v2", None),
    ],
)
def test_the_service_a_request_is_signed_for(authorization: str, service: str | None) -> None:
    # S3 requests skip the strict lock (nothing the reconcile loop ticks or observes); anything else takes it.
    assert signed_for({"HTTP_AUTHORIZATION": authorization} if authorization else {}) == service


def test_attaches_to_one_instance_are_applied_together_everything_else_one_by_one() -> None:
    def step(kind: str, iid: str, what: str = "") -> Step:
        return Step(kind, iid, volume_id=what or None)

    steps = [
        step("detach", "i-a", "vol-0"),
        step("attach", "i-b", "vol-1"),
        step("attach", "i-b", "vol-2"),
        step("attach", "i-c", "vol-3"),
        step("plug", "i-c"),
        step("attach", "i-c", "vol-4"),
    ]
    assert [[s.describe() for s in group] for group in batched(steps)] == [
        ["detach i-a vol-0"],
        ["attach i-b vol-1", "attach i-b vol-2"],
        ["attach i-c vol-3"],
        ["plug i-c"],
        ["attach i-c vol-4"],
    ]
