"""AwsCloud: the agent's stdlib AWS client. Error translation at the boundary (a table); every call over real
HTTP against a moto server on 127.0.0.1; throttling, expired credentials and dropped connections against a
scripted HTTP server; the credential chain."""

from __future__ import annotations

import datetime
import hashlib
import http.server
import threading
import urllib.request
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from kafka_asg.agent.aws import (
    AwsCloud,
    CredentialChain,
    Credentials,
    classify,
    error_of,
    service_endpoint,
)
from kafka_asg.agent.fakes import FakeImds
from kafka_asg.agent.ports import InstanceIdentity
from kafka_asg.config import CLUSTER_TAG, ROLE_TAG, SLOT_TAG
from kafka_asg.errors import ClaimLost, CloudError, NotFoundError, Unavailable
from kafka_asg.retry import Retry

REGION = "eu-west-1"
FAST = Retry(deadline=5.0, delay=0.01, max_delay=0.02, sleep=lambda s: None)
TESTING = Credentials("testing", "testing")


@pytest.mark.parametrize(
    ("code", "category"),
    [
        ("InvalidNetworkInterface.InUse", ClaimLost),
        ("VolumeInUse", ClaimLost),
        ("IncorrectState", ClaimLost),
        ("InvalidNetworkInterfaceID.NotFound", NotFoundError),
        ("InvalidInstanceID.NotFound", NotFoundError),
        ("NoSuchKey", NotFoundError),
        ("NoSuchBucket", NotFoundError),
        ("RequestLimitExceeded", Unavailable),
        ("Throttling", Unavailable),
        ("InternalError", Unavailable),
        ("ExpiredToken", Unavailable),
        ("UnauthorizedOperation", CloudError),
        ("InvalidParameterValue", CloudError),
    ],
)
def test_error_codes_are_translated(code: str, category: type[Exception]) -> None:
    err = classify(code, "boom", "Op", "eni-1")
    assert type(err) is category
    if isinstance(err, CloudError):
        assert err.code == code
    if isinstance(err, ClaimLost):
        assert err.resource_id == "eni-1"


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        # EC2's error document, Auto Scaling's (namespaced), S3's.
        (400, b"<Response><Errors><Error><Code>VolumeInUse</Code><Message>in use</Message></Error></Errors>"
              b"<RequestID>r</RequestID></Response>", ("VolumeInUse", "in use")),
        (400, b'<ErrorResponse xmlns="http://autoscaling.amazonaws.com/doc/2011-01-01/"><Error><Type>Sender</Type>'
              b"<Code>ValidationError</Code><Message>no group</Message></Error></ErrorResponse>",
         ("ValidationError", "no group")),
        (404, b"<Error><Code>NoSuchKey</Code><Message>The key does not exist</Message></Error>",
         ("NoSuchKey", "The key does not exist")),
        (503, b"", ("Throttling", "HTTP 503")),
        (502, b"<html>bad gateway</html>", ("InternalError", "HTTP 502")),
        (403, b"", ("403", "HTTP 403")),
    ],
)  # fmt: skip
def test_error_documents_of_each_api_are_read(status: int, body: bytes, expected: tuple[str, str]) -> None:
    assert error_of(status, body) == expected


def test_endpoints_follow_the_sdk_settings() -> None:
    assert service_endpoint("ec2", "eu-west-1", {}) == "https://ec2.eu-west-1.amazonaws.com"
    assert service_endpoint("autoscaling", "cn-north-1", {}) == "https://autoscaling.cn-north-1.amazonaws.com.cn"
    env = {"AWS_ENDPOINT_URL": "http://10.0.0.1:4566/", "AWS_ENDPOINT_URL_S3": "http://s3.local:9000"}
    assert service_endpoint("ec2", "eu-west-1", env) == "http://10.0.0.1:4566"
    assert service_endpoint("s3", "eu-west-1", env) == "http://s3.local:9000"


# ------------------------------------------------------------------------ the credential chain


def identity() -> InstanceIdentity:
    from ipaddress import IPv4Network

    return InstanceIdentity(
        "i-1", REGION, "eu-west-1b", "euw1-az2", "02:00:00:00:00:01", "subnet-1", IPv4Network("10.0.0.16/28"),
        "vpc-1", IPv4Address("10.0.0.25"),
    )  # fmt: skip


def test_environment_credentials_come_first() -> None:
    imds = FakeImds(identity())
    chain = CredentialChain(imds, env={"AWS_ACCESS_KEY_ID": "AKID", "AWS_SECRET_ACCESS_KEY": "s"})
    assert chain() == Credentials("AKID", "s", None)


def test_role_credentials_are_kept_until_shortly_before_they_expire() -> None:
    imds = FakeImds(identity())
    now = [1_800_000_000.0]
    expires = 1_800_000_000.0 + 3600
    expiration = datetime.datetime.fromtimestamp(expires, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    doc = {"AccessKeyId": "A1", "SecretAccessKey": "s1", "Token": "t1", "Expiration": expiration}
    imds.credentials = doc
    chain = CredentialChain(imds, env={}, clock=lambda: now[0])
    assert chain().access_key_id == "A1"
    imds.credentials = {**doc, "AccessKeyId": "A2"}
    now[0] = expires - 400  # more than 5 minutes left: the cached ones
    assert chain().access_key_id == "A1"
    now[0] = expires - 200  # IMDS has had new ones for a while
    assert chain().access_key_id == "A2"


def test_no_role_yet_is_unavailable_with_the_reason() -> None:
    imds = FakeImds(identity())
    imds.credentials = None
    with pytest.raises(Unavailable, match="is the instance profile attached"):
        CredentialChain(imds, env={})()


# ----------------------------------------------------------------------- against a moto server


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def aws(moto_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    ec2: Any = boto3.client("ec2", region_name=REGION, endpoint_url=moto_url)
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/26")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.0.16/28", AvailabilityZone="eu-west-1b")["Subnet"]
    other = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.0.32/28", AvailabilityZone="eu-west-1c")["Subnet"]

    def eni(subnet_id: str, ip: str, slot: int, cluster: str = "event-servers") -> str:
        tags = [
            {"Key": "Name", "Value": f"{cluster}-eni"},
            {"Key": CLUSTER_TAG, "Value": cluster},
            {"Key": SLOT_TAG, "Value": str(slot)},
        ]
        return str(
            ec2.create_network_interface(
                SubnetId=subnet_id,
                PrivateIpAddress=ip,
                TagSpecifications=[{"ResourceType": "network-interface", "Tags": tags}],
            )["NetworkInterface"]["NetworkInterfaceId"]
        )

    slot2 = eni(subnet["SubnetId"], "10.0.0.21", 2)
    eni(other["SubnetId"], "10.0.0.37", 3)  # another subnet
    eni(subnet["SubnetId"], "10.0.0.22", 7, cluster="someone-else")  # another cluster
    ec2.create_network_interface(SubnetId=subnet["SubnetId"], PrivateIpAddress="10.0.0.23")  # untagged
    vols = {}
    for role in ("zk-data", "zk-txlog", "kafka-log"):
        tags = [{"Key": CLUSTER_TAG, "Value": "event-servers"}, {"Key": SLOT_TAG, "Value": "2"}]
        tags.append({"Key": ROLE_TAG, "Value": role})
        vols[role] = ec2.create_volume(
            AvailabilityZone="eu-west-1b", Size=1, TagSpecifications=[{"ResourceType": "volume", "Tags": tags}]
        )["VolumeId"]
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    run = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, SubnetId=subnet["SubnetId"])
    s3: Any = boto3.client("s3", region_name=REGION, endpoint_url=moto_url)
    s3.create_bucket(Bucket="com.example.bkt", CreateBucketConfiguration={"LocationConstraint": REGION})
    s3.put_object(Bucket="com.example.bkt", Key="archives/a.tgz", Body=b"x" * 3_000_000)
    try:
        yield {
            "ec2": ec2,
            "subnet": subnet["SubnetId"],
            "slot2": slot2,
            "vols": vols,
            "image": image,
            "instance": run["Instances"][0]["InstanceId"],
            "cloud": AwsCloud(REGION, TESTING, endpoint_url=moto_url, retry=FAST),
        }
    finally:
        # moto's backends are process-global: the next test starts from an empty account.
        urllib.request.urlopen(urllib.request.Request(f"{moto_url}/moto-api/reset", method="POST"), timeout=10).close()


def test_slot_enis_found_by_tags_in_my_subnet(aws: dict[str, Any]) -> None:
    cloud: AwsCloud = aws["cloud"]
    enis = cloud.slot_enis("event-servers", aws["subnet"])
    mac = aws["ec2"].describe_network_interfaces(NetworkInterfaceIds=[aws["slot2"]])["NetworkInterfaces"][0]
    assert [(e.eni_id, e.slot, e.ip, e.status, e.attached_to, e.mac) for e in enis] == [
        (aws["slot2"], 2, IPv4Address("10.0.0.21"), "available", None, mac["MacAddress"].lower())
    ]


def test_attach_eni_then_read_back(aws: dict[str, Any]) -> None:
    cloud: AwsCloud = aws["cloud"]
    cloud.attach_eni(aws["slot2"], aws["instance"], 1)
    (eni,) = cloud.slot_enis("event-servers", aws["subnet"])
    assert (eni.attached_to, eni.status, eni.attachment_status) == (aws["instance"], "in-use", "attached")


def test_volumes_and_attach(aws: dict[str, Any]) -> None:
    cloud: AwsCloud = aws["cloud"]
    vols = cloud.slot_volumes("event-servers", 2)
    assert sorted(v.role for v in vols) == ["kafka-log", "zk-data", "zk-txlog"]
    assert all(v.attached_to is None and v.az == "eu-west-1b" and v.state == "available" for v in vols)
    cloud.attach_volume(aws["vols"]["zk-data"], aws["instance"], "/dev/sdf")
    attached = {v.role: (v.attached_to, v.device) for v in cloud.slot_volumes("event-servers", 2)}
    assert attached["zk-data"] == (aws["instance"], "/dev/sdf")
    assert cloud.slot_volumes("event-servers", 3) == []


def test_instance_state(aws: dict[str, Any]) -> None:
    cloud: AwsCloud = aws["cloud"]
    assert cloud.instance_state(aws["instance"]) == "running"
    assert cloud.instance_state("i-0123456789abcdef0") is None  # InvalidInstanceID.NotFound: EC2 forgot it


def test_report_sets_instance_tags(aws: dict[str, Any]) -> None:
    cloud: AwsCloud = aws["cloud"]
    cloud.report(aws["instance"], {"kafka-asg:state": "serving", "kafka-asg:decision": "x & <y> " * 50})
    tags = {
        t["Key"]: t["Value"]
        for t in aws["ec2"].describe_tags(Filters=[{"Name": "resource-id", "Values": [aws["instance"]]}])["Tags"]
    }
    assert tags["kafka-asg:state"] == "serving"
    assert tags["kafka-asg:decision"] == ("x & <y> " * 50)[:255]


def test_instance_volumes_for_per_instance_mode(aws: dict[str, Any]) -> None:
    cloud: AwsCloud = aws["cloud"]
    mappings = [{"DeviceName": d, "Ebs": {"VolumeSize": 1}} for d in ("/dev/sdb", "/dev/sdc", "/dev/sdd")]
    instance = aws["ec2"].run_instances(
        ImageId=aws["image"], MinCount=1, MaxCount=1, SubnetId=aws["subnet"], BlockDeviceMappings=mappings
    )["Instances"][0]["InstanceId"]
    found = cloud.instance_volumes(instance)
    assert {"/dev/sdb", "/dev/sdc", "/dev/sdd"} <= set(found)
    assert all(v.startswith("vol-") for v in found.values())


def test_scale_in_protection(aws: dict[str, Any], moto_url: str) -> None:
    cloud: AwsCloud = aws["cloud"]
    autoscaling: Any = boto3.client("autoscaling", region_name=REGION, endpoint_url=moto_url)
    autoscaling.create_launch_configuration(LaunchConfigurationName="lc", ImageId=aws["image"], InstanceType="t3.micro")
    autoscaling.create_auto_scaling_group(
        AutoScalingGroupName="asg", LaunchConfigurationName="lc", MinSize=1, MaxSize=1, VPCZoneIdentifier=aws["subnet"]
    )
    (member,) = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=["asg"])["AutoScalingGroups"][0][
        "Instances"
    ]
    cloud.set_scale_in_protection("asg", member["InstanceId"], True)
    (member,) = autoscaling.describe_auto_scaling_instances(InstanceIds=[member["InstanceId"]])["AutoScalingInstances"]
    assert member["ProtectedFromScaleIn"] is True
    cloud.set_scale_in_protection("asg", member["InstanceId"], False)
    (member,) = autoscaling.describe_auto_scaling_instances(InstanceIds=[member["InstanceId"]])["AutoScalingInstances"]
    assert member["ProtectedFromScaleIn"] is False


def test_s3_objects(aws: dict[str, Any], tmp_path: Path) -> None:
    cloud: AwsCloud = aws["cloud"]
    with pytest.raises(NotFoundError, match=r"s3://com.example.bkt/missing.json"):
        cloud.get_object("com.example.bkt", "missing.json")
    assert cloud.get_object("com.example.bkt", "archives/a.tgz") == b"x" * 3_000_000
    dest = tmp_path / "dl" / "a.tgz"
    digest = cloud.download("com.example.bkt", "archives/a.tgz", dest)
    assert dest.stat().st_size == 3_000_000
    assert digest == hashlib.sha256(dest.read_bytes()).hexdigest()  # hashed on the way
    with pytest.raises(NotFoundError, match=r"s3://com.example.bkt/archives/none.tgz"):
        cloud.download("com.example.bkt", "archives/none.tgz", tmp_path / "none.tgz")
    with pytest.raises(NotFoundError, match="NoSuchBucket"):
        cloud.get_object("no-such-bucket", "x")


# ------------------------------------------------------------------- against a scripted server


class Scripted(http.server.BaseHTTPRequestHandler):
    """Answers each request with the next (status, body) of ``script``; ``"close"`` drops the connection; a
    (status, body, length) step announces ``length`` bytes, sends ``body`` and drops the connection."""

    protocol_version = "HTTP/1.1"
    script: list[tuple[int, bytes] | tuple[int, bytes, int] | str] = []
    seen: list[dict[str, str]] = []

    def _answer(self) -> None:
        size = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(size).decode() if size else ""
        type(self).seen.append({"path": self.path, "body": body, **{k.lower(): v for k, v in self.headers.items()}})
        step = type(self).script.pop(0)
        if isinstance(step, str):  # "close"
            self.close_connection = True
            return
        status, data = step[0], step[1]
        announced = step[2] if len(step) == 3 else len(data)
        self.send_response(status)
        self.send_header("content-length", str(announced))
        self.end_headers()
        self.wfile.write(data)
        self.close_connection = announced != len(data)

    do_GET = do_POST = _answer

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def scripted() -> Iterator[tuple[str, type[Scripted]]]:
    handler = type("Handler", (Scripted,), {"script": [], "seen": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


RUNNING = (
    b'<DescribeInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"><reservationSet><item>'
    b"<instancesSet><item><instanceId>i-1</instanceId><instanceState><code>16</code><name>running</name>"
    b"</instanceState></item></instancesSet></item></reservationSet></DescribeInstancesResponse>"
)


def ec2_error(code: str, message: str) -> bytes:
    return (
        f"<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors></Response>".encode()
    )


def test_throttling_is_retried_and_requests_are_signed(scripted: tuple[str, type[Scripted]]) -> None:
    url, handler = scripted
    handler.script = [(503, ec2_error("RequestLimitExceeded", "slow down")), (200, RUNNING)]
    cloud = AwsCloud(REGION, Credentials("AKID", "secret", "tok"), endpoint_url=url, retry=FAST)
    assert cloud.instance_state("i-1") == "running"
    assert len(handler.seen) == 2
    request = handler.seen[-1]
    assert request["body"] == "Action=DescribeInstances&Version=2016-11-15&InstanceId.1=i-1"
    assert request["authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKID/")
    assert "/eu-west-1/ec2/aws4_request" in request["authorization"]
    assert request["x-amz-security-token"] == "tok"


def test_expired_credentials_are_read_again(scripted: tuple[str, type[Scripted]]) -> None:
    url, handler = scripted
    expired = (
        b"<Response><Errors><Error><Code>RequestExpired</Code><Message>expired</Message></Error></Errors></Response>"
    )
    handler.script = [(400, expired), (200, RUNNING)]
    imds = FakeImds(identity())
    imds.credentials = {"AccessKeyId": "OLD", "SecretAccessKey": "s", "Token": "t"}
    chain = CredentialChain(imds, env={})
    cloud = AwsCloud(REGION, chain, endpoint_url=url, retry=FAST)
    chain()  # cached, with no expiry: only AWS's answer can make it read them again
    imds.credentials = {"AccessKeyId": "NEW", "SecretAccessKey": "s", "Token": "t"}
    assert cloud.instance_state("i-1") == "running"
    assert [r["authorization"].split("/")[0] for r in handler.seen] == [
        "AWS4-HMAC-SHA256 Credential=OLD",
        "AWS4-HMAC-SHA256 Credential=NEW",
    ]


def test_a_dropped_keep_alive_connection_is_replaced(scripted: tuple[str, type[Scripted]]) -> None:
    url, handler = scripted
    handler.script = [(200, RUNNING), "close", (200, RUNNING)]
    cloud = AwsCloud(REGION, TESTING, endpoint_url=url, retry=Retry(deadline=5.0, max_tries=1))
    assert cloud.instance_state("i-1") == "running"
    assert cloud.instance_state("i-1") == "running"  # no retry allowed: the reconnect did it
    assert len(handler.seen) == 3


def test_an_unreachable_endpoint_is_unavailable() -> None:
    cloud = AwsCloud(REGION, TESTING, endpoint_url="http://127.0.0.1:9", retry=Retry(deadline=1, max_tries=2))
    with pytest.raises(Unavailable, match=r"cannot reach 127\.0\.0\.1:9"):
        cloud.slot_enis("c", "subnet-1")


def test_a_broken_download_starts_again_from_the_first_byte(
    scripted: tuple[str, type[Scripted]], tmp_path: Path
) -> None:
    url, handler = scripted
    handler.script = [(200, b"ab", 1 << 21), (200, b"abc")]  # 2 MiB announced, 2 bytes sent: broken off
    cloud = AwsCloud(REGION, TESTING, endpoint_url=url, retry=FAST)
    dest = tmp_path / "a"
    assert cloud.download("bkt", "k", dest) == hashlib.sha256(b"abc").hexdigest()
    assert dest.read_bytes() == b"abc"
    assert handler.seen[-1]["path"] == "/bkt/k"
    assert handler.seen[-1]["x-amz-content-sha256"] == hashlib.sha256(b"").hexdigest()


def test_attach_in_use_is_claim_lost_and_never_retried(scripted: tuple[str, type[Scripted]]) -> None:
    # Plain moto lets two instances attach one ENI (the rehearsal's strict layer does not): scripted here.
    url, handler = scripted
    handler.script = [(400, ec2_error("InvalidNetworkInterface.InUse", "Interface: [eni-2] in use."))]
    cloud = AwsCloud(REGION, TESTING, endpoint_url=url, retry=FAST)
    with pytest.raises(ClaimLost, match="in use") as lost:
        cloud.attach_eni("eni-2", "i-1", 1)
    assert lost.value.resource_id == "eni-2"
    assert len(handler.seen) == 1
    assert handler.seen[0]["body"] == (
        "Action=AttachNetworkInterface&Version=2016-11-15&NetworkInterfaceId=eni-2&InstanceId=i-1&DeviceIndex=1"
    )
