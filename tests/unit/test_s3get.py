"""The user data's stdlib S3 fetcher signs exactly as botocore does (SigV4, path-style, session token)."""

from __future__ import annotations

import datetime
import subprocess
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
from botocore.auth import S3SigV4Auth, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from kafka_asg import s3get
from kafka_asg.config import ClusterConfig
from kafka_asg.userdata import USER_DATA_LIMIT, render_user_data

CREDS = {"AccessKeyId": "AKIDEXAMPLE", "SecretAccessKey": "wJalrXUtnFEMI/K7MDENG", "Token": "session-token"}
NOW = datetime.datetime(2026, 11, 25, 12, 0, 0, tzinfo=datetime.UTC)


def botocore_authorization(url: str, region: str) -> str:
    request = AWSRequest(method="GET", url=url, headers={"x-amz-content-sha256": s3get.EMPTY_SHA256})
    signer = S3SigV4Auth(Credentials(CREDS["AccessKeyId"], CREDS["SecretAccessKey"], CREDS["Token"]), "s3", region)
    with mock.patch("botocore.auth.get_current_datetime", return_value=NOW.replace(tzinfo=None)):
        signer.add_auth(request)
    return str(request.headers["Authorization"])


@pytest.mark.parametrize(
    ("bucket", "key"),
    [
        ("com.example.event-servers", "agent/kafka-asg-agent.pyz"),
        ("bucket", "archives/kafka_2.13-3.9.2.tgz"),
        ("bucket", "dir/with space+plus.txt"),
    ],
)
def test_signature_matches_botocore(bucket: str, key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    url = s3get.object_url(bucket, key, "eu-west-1")
    assert url.startswith("https://s3.eu-west-1.amazonaws.com/" + bucket + "/")
    ours = s3get.signed_get(url, "eu-west-1", CREDS, NOW)
    assert ours.get_header("Authorization") == botocore_authorization(url, "eu-west-1")
    assert ours.get_header("X-amz-security-token") == "session-token"


@pytest.mark.parametrize("service", ["ec2", "autoscaling"])
def test_query_api_post_signature_matches_botocore(service: str) -> None:
    # The node agent's EC2 and Auto Scaling calls: a form-encoded POST to "/", signed with the body's hash.
    url = f"https://{service}.eu-west-1.amazonaws.com/"
    body = b"Action=DescribeVolumes&Version=2016-11-15&Filter.1.Name=tag%3Akafka-asg%3Aslot&Filter.1.Value.1=2"
    content_type = {"content-type": "application/x-www-form-urlencoded; charset=utf-8"}
    ours = s3get.sigv4_headers("POST", url, "eu-west-1", service, CREDS, now=NOW, body=body, headers=content_type)
    request = AWSRequest(method="POST", url=url, data=body, headers={"Content-Type": content_type["content-type"]})
    signer = SigV4Auth(
        Credentials(CREDS["AccessKeyId"], CREDS["SecretAccessKey"], CREDS["Token"]), service, "eu-west-1"
    )
    with mock.patch("botocore.auth.get_current_datetime", return_value=NOW.replace(tzinfo=None)):
        signer.add_auth(request)
    assert ours["authorization"] == request.headers["Authorization"]
    assert ours["x-amz-date"] == request.headers["X-Amz-Date"]


def test_endpoint_override_is_path_style(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://10.0.0.1:4566/")
    assert s3get.object_url("com.example.event-servers", "a/b", "eu-west-1") == (
        "http://10.0.0.1:4566/com.example.event-servers/a/b"
    )


@pytest.fixture
def seed_like(tmp_path: Path) -> Iterator[ClusterConfig]:
    from ipaddress import IPv4Address, IPv4Network

    from kafka_asg import config as c

    subnet = c.Subnet("eu-west-1b", IPv4Network("10.0.0.16/28"))
    yield c.ClusterConfig(
        name="event-servers", region="eu-west-1", mode="zookeeper", vpc_cidr=IPv4Network("10.0.0.0/26"), vpc_id=None,
        subnets=(subnet,), slots=(c.Slot(2, "eu-west-1b", IPv4Address("10.0.0.21"), subnet),), ports=c.Ports(),
        bucket="com.example.event-servers", zookeeper_config=tmp_path / "z", kafka_config=tmp_path / "k",
        zookeeper=c.ServerSpec("3.8.7", "archives/z.tgz"), kafka=c.ServerSpec("3.9.2", "archives/k.tgz"),
        volumes="per-slot", volume=c.VolumeSpec(), instance_type="m6i.large", ami="ami-1",
        asg=c.AsgSize(2, 3, 4), bastion_security_group=None,
    )  # fmt: skip


def test_user_data_is_valid_sh_and_small(seed_like: ClusterConfig, tmp_path: Path) -> None:
    script = render_user_data(seed_like)
    assert len(script.encode()) < USER_DATA_LIMIT // 2
    path = tmp_path / "ud.sh"
    path.write_text(script)
    subprocess.run(["sh", "-n", str(path)], check=True)
    assert "BUCKET=com.example.event-servers" in script
    assert "run --bucket $BUCKET --region $REGION --cluster $CLUSTER" in script
    # The fetcher and the agent run isolated, without the system's site-packages (under systemd and without).
    assert "PY_FLAGS='-I -S'" in script
    assert '"$PY" $PY_FLAGS - "$BUCKET"' in script
    assert "ExecStart=$PY $PY_FLAGS $AGENT $ARGS" in script
    assert 'AGENT_CMD="\\"$PY\\" $PY_FLAGS \\"$AGENT\\" $ARGS"' in script
    # The embedded fetcher is the module itself, so what the tests check is what instances run.
    assert Path(s3get.__file__).read_text().rstrip("\n") in script
