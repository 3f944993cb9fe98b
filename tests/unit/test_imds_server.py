"""The local IMDS over real HTTP on 127.0.0.1 (loopback only), with a fake source-address mapping."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network

import pytest

from kafka_asg.local.imds import ImdsNic, ImdsServer, ImdsService, ImdsView

PRIMARY = ImdsNic(
    mac="0e:00:00:00:00:01",
    device_number=0,
    interface_id="eni-primary",
    subnet_id="subnet-a",
    vpc_id="vpc-1",
    subnet_cidr=IPv4Network("10.0.0.16/28"),
    local_ipv4s=(IPv4Address("10.0.0.20"),),
)
SLOT_ENI = ImdsNic(
    mac="0e:00:00:00:00:02",
    device_number=1,
    interface_id="eni-slot1",
    subnet_id="subnet-a",
    vpc_id="vpc-1",
    subnet_cidr=IPv4Network("10.0.0.16/28"),
    local_ipv4s=(IPv4Address("10.0.0.21"),),
)


def view(tokens_required: bool, nics: tuple[ImdsNic, ...] = (PRIMARY,)) -> ImdsView:
    return ImdsView(
        instance_id="i-0abc",
        region="eu-west-1",
        az="eu-west-1a",
        az_id="euw1-az3",
        local_ipv4=IPv4Address("10.0.0.20"),
        nics=nics,
        tokens_required=tokens_required,
        role="kafka-role",
        user_data=b"#!/bin/sh\necho hi\n",
    )


class Mapping:
    """Fake source mapping: every request from 127.0.0.1 is 'the instance'."""

    def __init__(self, v: ImdsView) -> None:
        self.view = v

    def __call__(self, address: IPv4Address) -> ImdsView | None:
        return self.view if address == IPv4Address("127.0.0.1") else None


@pytest.fixture
def served() -> Iterator[tuple[str, Mapping]]:
    mapping = Mapping(view(tokens_required=True))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    server = ImdsServer(sock, ImdsService(mapping))
    server.start()
    host, port = server.address
    try:
        yield f"http://{host}:{port}", mapping
    finally:
        server.stop()


def call(url: str, method: str = "GET", headers: dict[str, str] | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def token(base: str, ttl: str = "60") -> str:
    status, body = call(base + "/latest/api/token", "PUT", {"X-aws-ec2-metadata-token-ttl-seconds": ttl})
    assert status == 200
    return body


def test_v2_token_flow_and_identity_paths(served: tuple[str, Mapping]) -> None:
    base, _ = served
    h = {"X-aws-ec2-metadata-token": token(base)}
    md = base + "/latest/meta-data/"
    assert call(md + "instance-id", headers=h) == (200, "i-0abc")
    assert call(md + "placement/availability-zone", headers=h) == (200, "eu-west-1a")
    assert call(md + "placement/availability-zone-id", headers=h) == (200, "euw1-az3")
    assert call(md + "placement/region", headers=h) == (200, "eu-west-1")
    assert call(md + "mac", headers=h) == (200, PRIMARY.mac)
    assert call(md + "local-ipv4", headers=h) == (200, "10.0.0.20")
    assert call(md + "autoscaling/target-lifecycle-state", headers=h) == (200, "InService")
    assert call(base + "/latest/user-data", headers=h) == (200, "#!/bin/sh\necho hi\n")
    nic = f"{md}network/interfaces/macs/{PRIMARY.mac}/"
    assert call(nic + "device-number", headers=h) == (200, "0")
    assert call(nic + "interface-id", headers=h) == (200, "eni-primary")
    assert call(nic + "subnet-id", headers=h) == (200, "subnet-a")
    assert call(nic + "vpc-id", headers=h) == (200, "vpc-1")
    assert call(nic + "subnet-ipv4-cidr-block", headers=h) == (200, "10.0.0.16/28")
    assert call(nic + "local-ipv4s", headers=h) == (200, "10.0.0.20")


def test_requests_without_a_valid_token_get_401_when_tokens_are_required(served: tuple[str, Mapping]) -> None:
    base, mapping = served
    md = base + "/latest/meta-data/instance-id"
    assert call(md)[0] == 401
    assert call(md, headers={"X-aws-ec2-metadata-token": "forged"})[0] == 401
    mapping.view = view(tokens_required=False)
    assert call(md) == (200, "i-0abc")  # IMDSv1 allowed when HttpTokens=optional


def test_token_ttl_must_be_given_and_in_range(served: tuple[str, Mapping]) -> None:
    base, _ = served
    assert call(base + "/latest/api/token", "PUT")[0] == 400
    assert call(base + "/latest/api/token", "PUT", {"X-aws-ec2-metadata-token-ttl-seconds": "21601"})[0] == 400


def test_expired_token_is_refused() -> None:
    now = [100.0]
    service = ImdsService(Mapping(view(True)), clock=lambda: now[0])
    reply = service.handle("PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "5"}, "127.0.0.1")
    good = {"X-aws-ec2-metadata-token": reply.body.decode()}
    assert service.handle("GET", "/latest/meta-data/instance-id", good, "127.0.0.1").status == 200
    now[0] += 6
    assert service.handle("GET", "/latest/meta-data/instance-id", good, "127.0.0.1").status == 401


def test_unknown_source_address_gets_nothing() -> None:
    service = ImdsService(Mapping(view(False)))
    assert service.handle("GET", "/latest/meta-data/instance-id", {}, "127.0.0.2").status == 404


def test_hot_plugged_eni_appears_and_credentials_have_the_aws_shape(served: tuple[str, Mapping]) -> None:
    base, mapping = served
    h = {"X-aws-ec2-metadata-token": token(base)}
    macs = base + "/latest/meta-data/network/interfaces/macs/"
    assert call(macs, headers=h) == (200, PRIMARY.mac + "/")
    mapping.view = view(True, (PRIMARY, SLOT_ENI))
    assert call(macs, headers=h) == (200, f"{PRIMARY.mac}/\n{SLOT_ENI.mac}/")
    assert call(f"{macs}{SLOT_ENI.mac}/device-number", headers=h) == (200, "1")
    assert call(base + "/latest/meta-data/iam/security-credentials/", headers=h) == (200, "kafka-role")
    status, body = call(base + "/latest/meta-data/iam/security-credentials/kafka-role", headers=h)
    assert status == 200
    creds = json.loads(body)
    assert {"AccessKeyId", "SecretAccessKey", "Token", "Expiration"} <= set(creds)
