"""``kafka-asg-agent run --once`` wired end to end with real parts: boto3 against a moto server on 127.0.0.1
(through AWS_ENDPOINT_URL, as in the rehearsal), HttpImds against the local region's IMDS server, the cluster's
inputs read from the bucket. One cycle = the claim; the second instance in the subnet stands by."""

from __future__ import annotations

import hashlib
import json
import socket
import urllib.request
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from kafka_asg.agent.main import main
from kafka_asg.agent.status import read_status
from kafka_asg.config import CLUSTER_TAG, SLOT_TAG, config_to_document, seed_config
from kafka_asg.local.imds import ImdsNic, ImdsServer, ImdsService, ImdsView
from kafka_asg.paths import AgentPaths

REGION = "eu-west-1"


@pytest.fixture
def moto_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        yield url
    finally:
        # moto's backends are process-global: reset them so the next test starts from an empty account.
        urllib.request.urlopen(urllib.request.Request(f"{url}/moto-api/reset", method="POST"), timeout=10).close()
        server.stop()


def setup_account(endpoint: str) -> dict[str, Any]:
    cfg = seed_config()
    ec2: Any = boto3.client("ec2", region_name=REGION, endpoint_url=endpoint)
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/26")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.0.16/28", AvailabilityZone="eu-west-1b")["Subnet"]["SubnetId"]
    tags = [
        {"Key": "Name", "Value": cfg.eni_name},
        {"Key": CLUSTER_TAG, "Value": cfg.name},
        {"Key": SLOT_TAG, "Value": "2"},
    ]
    eni = ec2.create_network_interface(
        SubnetId=subnet,
        PrivateIpAddress="10.0.0.21",
        TagSpecifications=[{"ResourceType": "network-interface", "Tags": tags}],
    )["NetworkInterface"]["NetworkInterfaceId"]
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    instances = [
        ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, SubnetId=subnet, PrivateIpAddress=ip)["Instances"][0]
        for ip in ("10.0.0.25", "10.0.0.26")
    ]
    s3: Any = boto3.client("s3", region_name=REGION, endpoint_url=endpoint)
    s3.create_bucket(Bucket=cfg.bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
    objects = {
        "cluster.json": json.dumps(config_to_document(cfg)).encode(),
        "zookeeper.config": cfg.zookeeper_config.read_bytes(),
        "kafka.config": cfg.kafka_config.read_bytes(),
    }
    for key, data in objects.items():
        s3.put_object(Bucket=cfg.bucket, Key=key, Body=data)
    manifest = {"files": {k: {"sha256": hashlib.sha256(v).hexdigest(), "size": len(v)} for k, v in objects.items()}}
    s3.put_object(Bucket=cfg.bucket, Key="manifest.json", Body=json.dumps(manifest).encode())
    return {"ec2": ec2, "vpc": vpc, "subnet": subnet, "eni": eni, "instances": instances, "cfg": cfg}


def imds_for(account: dict[str, Any], instance: dict[str, Any]) -> ImdsServer:
    nic = ImdsNic(
        mac=instance["NetworkInterfaces"][0]["MacAddress"],
        device_number=0,
        interface_id=instance["NetworkInterfaces"][0]["NetworkInterfaceId"],
        subnet_id=account["subnet"],
        vpc_id=account["vpc"],
        subnet_cidr=IPv4Network("10.0.0.16/28"),
        local_ipv4s=(IPv4Address(instance["PrivateIpAddress"]),),
    )
    view = ImdsView(
        instance_id=instance["InstanceId"],
        region=REGION,
        az="eu-west-1b",
        az_id="euw1-az2",
        local_ipv4=IPv4Address(instance["PrivateIpAddress"]),
        nics=(nic,),
        tokens_required=True,
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    server = ImdsServer(sock, ImdsService(lambda ip: view))
    server.start()
    return server


def run_once(account: dict[str, Any], instance: dict[str, Any], root: Path) -> None:
    imds = imds_for(account, instance)
    host, port = imds.address
    try:
        code = main(
            [
                "run",
                "--bucket",
                account["cfg"].bucket,
                "--region",
                REGION,
                "--cluster",
                account["cfg"].name,
                "--root",
                str(root),
                "--imds-url",
                f"http://{host}:{port}",
                "--once",
            ]
        )
    finally:
        imds.stop()
    assert code == 0


def test_run_once_claims_then_a_second_instance_stands_by(
    moto_endpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    account = setup_account(moto_endpoint)
    first, second = account["instances"]
    run_once(account, first, tmp_path / "first")
    assert capsys.readouterr().out == f"claimed {account['eni']} (slot 2, 10.0.0.21)\n"
    eni = account["ec2"].describe_network_interfaces(NetworkInterfaceIds=[account["eni"]])["NetworkInterfaces"][0]
    assert eni["Attachment"]["InstanceId"] == first["InstanceId"]
    status = read_status(AgentPaths(root=tmp_path / "first").status_file)
    assert status is not None
    assert (status.state, status.slot, status.instance_id) == ("booting", 2, first["InstanceId"])
    base = AgentPaths(root=tmp_path / "first").config_dir / "base"
    assert (base / "kafka.config").read_bytes() == account["cfg"].kafka_config.read_bytes()
    tags = {
        t["Key"]: t["Value"]
        for t in account["ec2"].describe_tags(Filters=[{"Name": "resource-id", "Values": [first["InstanceId"]]}])[
            "Tags"
        ]
    }
    assert tags["kafka-asg:state"] == "booting"
    assert tags["kafka-asg:slot"] == "2"

    run_once(account, second, tmp_path / "second")
    assert capsys.readouterr().out == (
        f"standing by: every slot of {account['subnet']} is held by a live instance (slot 2: {first['InstanceId']})\n"
    )


def test_run_with_wrong_cluster_name_fails_clearly(
    moto_endpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    account = setup_account(moto_endpoint)
    code = main(["run", "--bucket", account["cfg"].bucket, "--region", REGION, "--cluster", "nope", "--once",
                 "--root", str(tmp_path)])  # fmt: skip
    assert code == 1
    assert "cluster.json is for cluster 'event-servers', not 'nope': check --cluster" in capsys.readouterr().err
