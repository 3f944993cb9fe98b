"""The local region with the real Linux machinery (root, namespaces, loop devices).

Runs its own region next to others on the machine: its own state dir, port, VPC namespace and cluster name.
Everything is torn down with ``stop_region`` in ``finally``; the fixture then checks nothing of it is left.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import boto3
import pytest
from tests.integration.dist_tools import free_port

from kafka_asg.config import seed_config
from kafka_asg.local.commands import RegionInfo, ensure_region, make_hosts, region_info, stop_region
from kafka_asg.local.hostapi import ebs_by_id_path
from kafka_asg.local.strict import StrictOptions
from kafka_asg.paths import RegionPaths

pytestmark = pytest.mark.rehearsal

T = TypeVar("T")
PY = "/work/main/.venv/bin/python"
DETACH_DELAY = 3.0

# User data that uses only IMDS (v2) and the AWS SDK, like the seed's boot script: find the ENI tagged for
# this test in the instance's own AZ and the tagged volume, attach both to itself (retrying while in use).
CLAIM = f"""#!/bin/sh
exec {PY} - <<'PYEOF'
import time, urllib.request, boto3
def imds(path, token=None, method="GET"):
    if token is None:
        headers = {{"X-aws-ec2-metadata-token-ttl-seconds": "60"}}
    else:
        headers = {{"X-aws-ec2-metadata-token": token}}
    req = urllib.request.Request("http://169.254.169.254/latest/" + path, method=method, headers=headers)
    with urllib.request.urlopen(req, timeout=5) as resp:
        return resp.read().decode()
token = imds("api/token", method="PUT")
me = imds("meta-data/instance-id", token)
az = imds("meta-data/placement/availability-zone", token)
region = imds("meta-data/placement/region", token)
print("booted", me, az, flush=True)
ec2 = boto3.client("ec2", region_name=region)
for _ in range(120):
    try:
        eni = ec2.describe_network_interfaces(Filters=[{{"Name": "tag:it", "Values": ["eni"]}},
            {{"Name": "availability-zone", "Values": [az]}}])["NetworkInterfaces"][0]
        vol = ec2.describe_volumes(Filters=[{{"Name": "tag:it", "Values": ["vol"]}}])["Volumes"][0]
        if eni.get("Attachment", {{}}).get("InstanceId") != me:
            ec2.attach_network_interface(NetworkInterfaceId=eni["NetworkInterfaceId"], InstanceId=me, DeviceIndex=1)
        if not vol["Attachments"] or vol["Attachments"][0]["InstanceId"] != me:
            ec2.attach_volume(VolumeId=vol["VolumeId"], InstanceId=me, Device="/dev/sdf")
        print("claimed", eni["NetworkInterfaceId"], vol["VolumeId"], flush=True)
        break
    except Exception as exc:
        print("waiting:", exc, flush=True)
        time.sleep(1)
PYEOF
"""


def wait_for(what: str, check: Callable[[], T | None], timeout: float = 60.0) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@dataclasses.dataclass
class Region:
    info: RegionInfo
    paths: RegionPaths
    ec2: Any
    asg: Any
    iam: Any
    subnets: dict[str, str]
    hosts: Any

    def exec(self, iid: str, *argv: str) -> subprocess.CompletedProcess[bytes]:
        return self.hosts.exec_in(iid, list(argv), timeout=30)  # type: ignore[no-any-return]


@pytest.fixture
def region(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Region]:
    name = f"it{os.getpid() % 10000}"
    monkeypatch.setenv("KAFKA_ASG_VPC_NETNS", f"kasg-{name}-vpc")
    cfg = dataclasses.replace(seed_config(), name=name)
    paths = RegionPaths(tmp_path / "region")
    before = netns()
    launched: set[str] = set()
    try:
        info = ensure_region(
            cfg, paths, options=StrictOptions(boot_delay=0.5, detach_delay=DETACH_DELAY), port=free_port()
        )
        kw: dict[str, Any] = {
            "endpoint_url": info.endpoint_url,
            "region_name": info.region,
            "aws_access_key_id": "testing",
            "aws_secret_access_key": "testing",
        }
        ec2 = boto3.client("ec2", **kw)
        tagged = ec2.describe_subnets(Filters=[{"Name": "tag:kafka-asg:cluster", "Values": [name]}])["Subnets"]
        subnets = {s["AvailabilityZone"]: s["SubnetId"] for s in tagged}
        yield Region(
            info,
            paths,
            ec2,
            boto3.client("autoscaling", **kw),
            boto3.client("iam", **kw),
            subnets,
            make_hosts(paths),
        )
    finally:
        info_now = region_info(paths)
        if info_now is not None:
            client = boto3.client(
                "ec2",
                endpoint_url=info_now.endpoint_url,
                region_name=info_now.region,
                aws_access_key_id="testing",
                aws_secret_access_key="testing",
            )
            for reservation in client.describe_instances()["Reservations"]:
                launched.update(i["InstanceId"] for i in reservation["Instances"])
        stop_region(paths)
    assert region_info(paths) is None
    assert not paths.root.exists()
    ours = {n for n in netns() - before if n in launched or n.startswith((f"kasg-{name}", f"{name}-"))}
    assert not ours, f"left behind: {ours}"


def launch_template(r: Region, user_data: str) -> None:
    r.iam.create_role(RoleName="it-role", AssumeRolePolicyDocument="{}")
    r.iam.create_instance_profile(InstanceProfileName="it-profile")
    r.iam.add_role_to_instance_profile(InstanceProfileName="it-profile", RoleName="it-role")
    r.ec2.create_launch_template(
        LaunchTemplateName="it-template",
        LaunchTemplateData={
            "ImageId": "resolve:ssm:/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64",
            "UserData": base64.b64encode(user_data.encode()).decode(),
            "IamInstanceProfile": {"Name": "it-profile"},
            "MetadataOptions": {"HttpTokens": "required"},
        },
    )


def run(r: Region, az: str) -> str:
    out = r.ec2.run_instances(
        MinCount=1, MaxCount=1, SubnetId=r.subnets[az], LaunchTemplate={"LaunchTemplateName": "it-template"}
    )
    return str(out["Instances"][0]["InstanceId"])


def log_of(r: Region, iid: str) -> str:
    if iid not in netns():
        return ""
    return r.exec(iid, "cat", "/var/log/cloud-init-output.log").stdout.decode(errors="replace")


def test_user_data_attaches_eni_and_volume_and_the_data_moves_with_the_volume(region: Region) -> None:
    r = region
    az = "eu-west-1a"
    eni = r.ec2.create_network_interface(
        SubnetId=r.subnets[az],
        PrivateIpAddress="10.0.0.53",
        TagSpecifications=[{"ResourceType": "network-interface", "Tags": [{"Key": "it", "Value": "eni"}]}],
    )["NetworkInterface"]
    vol = r.ec2.create_volume(
        Size=1,
        AvailabilityZone=az,
        TagSpecifications=[{"ResourceType": "volume", "Tags": [{"Key": "it", "Value": "vol"}]}],
    )["VolumeId"]
    launch_template(r, CLAIM)
    first = run(r, az)
    wait_for("user data to claim", lambda: "claimed" in log_of(r, first))

    def links() -> str:
        argv = ["ip", "netns", "exec", first, "ip", "-o", "link"]
        return subprocess.run(argv, capture_output=True, text=True, check=False).stdout

    wait_for("the ENI's NIC in the instance", lambda: eni["MacAddress"] in links())
    device = ebs_by_id_path(vol)
    wait_for("the volume under by-id", lambda: r.exec(first, "test", "-b", device).returncode == 0)
    wrote = r.exec(first, "sh", "-c", f"printf kafka-asg-was-here | dd of={device} bs=512 conv=sync,fsync 2>&1")
    assert wrote.returncode == 0, wrote.stdout

    r.ec2.terminate_instances(InstanceIds=[first])
    second = run(r, az)
    wait_for("the second instance to claim", lambda: "claimed" in log_of(r, second), timeout=90)
    wait_for("the volume in the second instance", lambda: r.exec(second, "test", "-b", device).returncode == 0)
    read = r.exec(second, "sh", "-c", f"dd if={device} bs=18 count=1 2>/dev/null")
    assert read.stdout == b"kafka-asg-was-here"
    assert first not in netns()


def test_asg_over_three_subnets_replaces_a_killed_instance_in_its_az(region: Region) -> None:
    r = region
    launch_template(r, "#!/bin/sh\necho up\n")
    r.asg.create_auto_scaling_group(
        AutoScalingGroupName="it-asg",
        MinSize=3,
        MaxSize=3,
        DesiredCapacity=3,
        LaunchTemplate={"LaunchTemplateName": "it-template", "Version": "$Latest"},
        VPCZoneIdentifier=",".join(r.subnets.values()),
    )

    def members() -> dict[str, str]:
        group = r.asg.describe_auto_scaling_groups(AutoScalingGroupNames=["it-asg"])["AutoScalingGroups"][0]
        return {i["InstanceId"]: i["AvailabilityZone"] for i in group["Instances"]}

    first = members()
    assert sorted(first.values()) == ["eu-west-1a", "eu-west-1b", "eu-west-1c"]
    wait_for("three hosts", lambda: set(first) <= netns())
    victim = next(i for i, az in first.items() if az == "eu-west-1b")
    eni_id = r.ec2.create_network_interface(SubnetId=r.subnets["eu-west-1b"], PrivateIpAddress="10.0.0.21")[
        "NetworkInterface"
    ]["NetworkInterfaceId"]
    r.ec2.attach_network_interface(NetworkInterfaceId=eni_id, InstanceId=victim, DeviceIndex=1)
    r.ec2.terminate_instances(InstanceIds=[victim])
    killed_at = time.monotonic()

    def eni() -> dict[str, Any]:
        return dict(r.ec2.describe_network_interfaces(NetworkInterfaceIds=[eni_id])["NetworkInterfaces"][0])

    assert (eni()["Status"], eni()["Attachment"]["Status"]) == ("in-use", "detaching")
    wait_for("the ENI to become available", lambda: eni()["Status"] == "available")
    assert time.monotonic() - killed_at >= DETACH_DELAY - 0.5

    def replaced() -> dict[str, str] | None:
        now = members()
        return now if len(now) == 3 and victim not in now else None

    now = wait_for("a replacement", replaced)
    assert sorted(now.values()) == ["eu-west-1a", "eu-west-1b", "eu-west-1c"]
    replacement = next(i for i, az in now.items() if az == "eu-west-1b")
    wait_for("the replacement's host", lambda: replacement in netns())
    wait_for("the victim's host to be gone", lambda: victim not in netns())
