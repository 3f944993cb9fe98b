"""AwsCloud: error translation at the boundary (a table), and the calls against moto in-process."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError, CredentialRetrievalError, EndpointConnectionError, NoCredentialsError
from botocore.stub import Stubber
from moto import mock_aws

from kafka_asg.agent.aws import AwsCloud, translate
from kafka_asg.config import CLUSTER_TAG, ROLE_TAG, SLOT_TAG
from kafka_asg.errors import ClaimLost, CloudError, NotFoundError, Unavailable
from kafka_asg.retry import Retry

REGION = "eu-west-1"
FAST = Retry(deadline=5.0, delay=0.01, max_delay=0.02, sleep=lambda s: None)


def client_error(code: str, message: str = "boom") -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": message}}, "Op")


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
        ("UnauthorizedOperation", CloudError),
        ("InvalidParameterValue", CloudError),
    ],
)
def test_client_errors_are_translated(code: str, category: type[Exception]) -> None:
    err = translate(client_error(code), "Op", "eni-1")
    assert type(err) is category
    if isinstance(err, CloudError):
        assert err.code == code
    if isinstance(err, ClaimLost):
        assert err.resource_id == "eni-1"


@pytest.mark.parametrize(
    "exc",
    [
        EndpointConnectionError(endpoint_url="http://x"),
        NoCredentialsError(),
        CredentialRetrievalError(provider="instance-metadata", error_msg="timed out"),
    ],
)
def test_connection_and_credential_errors_are_unavailable(exc: Exception) -> None:
    assert isinstance(translate(exc, "Op"), Unavailable)


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    for var in ("AWS_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        ec2: Any = boto3.client("ec2", region_name=REGION)
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
                AvailabilityZone="eu-west-1b",
                Size=1,
                TagSpecifications=[{"ResourceType": "volume", "Tags": tags}],
            )["VolumeId"]
        image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
        instance = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, SubnetId=subnet["SubnetId"])["Instances"][
            0
        ]["InstanceId"]
        s3: Any = boto3.client("s3", region_name=REGION)
        s3.create_bucket(Bucket="bkt", CreateBucketConfiguration={"LocationConstraint": REGION})
        s3.put_object(Bucket="bkt", Key="archives/a.tgz", Body=b"x" * 3_000_000)
        yield {
            "ec2": ec2,
            "subnet": subnet["SubnetId"],
            "slot2": slot2,
            "vols": vols,
            "instance": instance,
            "cloud": AwsCloud(REGION, retry=FAST),
        }


def test_slot_enis_found_by_tags_in_my_subnet(aws: dict[str, Any]) -> None:
    cloud: AwsCloud = aws["cloud"]
    enis = cloud.slot_enis("event-servers", aws["subnet"])
    assert [(e.eni_id, e.slot, e.ip, e.status, e.attached_to) for e in enis] == [
        (aws["slot2"], 2, IPv4Address("10.0.0.21"), "available", None)
    ]


def test_attach_eni_then_read_back(aws: dict[str, Any]) -> None:
    cloud: AwsCloud = aws["cloud"]
    cloud.attach_eni(aws["slot2"], aws["instance"], 1)
    (eni,) = cloud.slot_enis("event-servers", aws["subnet"])
    assert eni.attached_to == aws["instance"]
    assert eni.status == "in-use"


def test_attach_in_use_is_claim_lost(aws: dict[str, Any]) -> None:
    cloud: AwsCloud = aws["cloud"]
    stub = Stubber(cloud.ec2)
    stub.add_client_error(
        "attach_network_interface", "InvalidNetworkInterface.InUse", f"Interface: [{aws['slot2']}] in use."
    )
    with stub, pytest.raises(ClaimLost) as lost:
        cloud.attach_eni(aws["slot2"], aws["instance"], 1)
    assert lost.value.resource_id == aws["slot2"]


def test_throttling_is_retried(aws: dict[str, Any]) -> None:
    cloud: AwsCloud = aws["cloud"]
    stub = Stubber(cloud.ec2)
    stub.add_client_error("describe_instances", "RequestLimitExceeded", "Request limit exceeded.")
    stub.add_response(
        "describe_instances",
        {"Reservations": [{"Instances": [{"InstanceId": "i-1", "State": {"Code": 16, "Name": "running"}}]}]},
        {"InstanceIds": ["i-1"]},
    )
    with stub:
        assert cloud.instance_state("i-1") == "running"
    stub.assert_no_pending_responses()


def test_volumes_and_attach(aws: dict[str, Any]) -> None:
    cloud: AwsCloud = aws["cloud"]
    vols = cloud.slot_volumes("event-servers", 2)
    assert sorted(v.role for v in vols) == ["kafka-log", "zk-data", "zk-txlog"]
    assert all(v.attached_to is None and v.az == "eu-west-1b" for v in vols)
    cloud.attach_volume(aws["vols"]["zk-data"], aws["instance"], "/dev/sdf")
    attached = {v.role: (v.attached_to, v.device) for v in cloud.slot_volumes("event-servers", 2)}
    assert attached["zk-data"] == (aws["instance"], "/dev/sdf")
    assert cloud.slot_volumes("event-servers", 3) == []


def test_instance_state(aws: dict[str, Any]) -> None:
    cloud: AwsCloud = aws["cloud"]
    assert cloud.instance_state(aws["instance"]) == "running"
    assert cloud.instance_state("i-0123456789abcdef0") is None


def test_report_sets_instance_tags(aws: dict[str, Any]) -> None:
    cloud: AwsCloud = aws["cloud"]
    cloud.report(aws["instance"], {"kafka-asg:state": "serving", "kafka-asg:decision": "x" * 400})
    tags = {
        t["Key"]: t["Value"]
        for t in aws["ec2"].describe_tags(Filters=[{"Name": "resource-id", "Values": [aws["instance"]]}])["Tags"]
    }
    assert tags["kafka-asg:state"] == "serving"
    assert len(tags["kafka-asg:decision"]) == 255


def test_s3_objects(aws: dict[str, Any], tmp_path: Path) -> None:
    cloud: AwsCloud = aws["cloud"]
    with pytest.raises(NotFoundError, match=r"s3://bkt/missing.json"):
        cloud.get_object("bkt", "missing.json")
    dest = tmp_path / "dl" / "a.tgz"
    digest = cloud.download("bkt", "archives/a.tgz", dest)
    assert dest.stat().st_size == 3_000_000
    assert digest == hashlib.sha256(dest.read_bytes()).hexdigest()  # hashed on the way
    # ... and checked against manifest.json by the caller: botocore's own CRC32 pass over the body is off.
    assert cloud.s3.meta.config.response_checksum_validation == "when_required"
    with pytest.raises(NotFoundError, match=r"s3://bkt/archives/none.tgz"):
        cloud.download("bkt", "archives/none.tgz", tmp_path / "none.tgz")


def test_instance_volumes_for_per_instance_mode(aws: dict[str, Any]) -> None:
    cloud: AwsCloud = aws["cloud"]
    ec2 = aws["ec2"]
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    mappings = [{"DeviceName": d, "Ebs": {"VolumeSize": 1}} for d in ("/dev/sdb", "/dev/sdc", "/dev/sdd")]
    instance = ec2.run_instances(
        ImageId=image, MinCount=1, MaxCount=1, SubnetId=aws["subnet"], BlockDeviceMappings=mappings
    )["Instances"][0]["InstanceId"]
    found = cloud.instance_volumes(instance)
    assert {"/dev/sdb", "/dev/sdc", "/dev/sdd"} <= set(found)
    assert all(v.startswith("vol-") for v in found.values())


def test_clients_made_before_credentials_existed_recover(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A new instance's role credentials can show up in IMDS after the agent made its clients; botocore keeps a
    # client's missing credentials for ever, so the adapter rebuilds its clients after a miss.
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with mock_aws():
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
            monkeypatch.delenv(name, raising=False)
        cloud = AwsCloud("eu-west-1", retry=Retry(deadline=5, max_tries=2, delay=0.01))
        with pytest.raises(Unavailable, match="no AWS credentials"):
            cloud.instance_state("i-0123456789abcdef0")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        assert cloud.instance_state("i-0123456789abcdef0") is None  # the rebuilt clients sign: EC2 answers
