"""The agent's :class:`~kafka_asg.agent.ports.Cloud` on botocore (boto3's core): EC2, Auto Scaling and S3.

botocore clients, not boto3's: the agent calls client methods only, and boto3 adds nothing to them but an import
of s3transfer and its resource layer, about 0.1 s of CPU on every new instance's boot (the operator side, which
does not boot with every node, uses boto3).

Every botocore error is translated here, at the boundary (amazon.aws ``AWSErrorHandler`` style):

- ``InvalidNetworkInterface.InUse`` / ``VolumeInUse`` / ``IncorrectState`` -> :class:`ClaimLost` (the attach
  call is the lock; never retried blindly);
- ``*.NotFound`` / ``NoSuchKey`` / ``NoSuchBucket`` / 404 -> :class:`NotFoundError` naming the object;
- :data:`~kafka_asg.retry.RETRYABLE_AWS_CODES` and connection failures -> :class:`Unavailable`, retried by
  :class:`~kafka_asg.retry.Retry` (botocore's own retries are off: one retry policy);
- anything else -> :class:`CloudError` carrying the AWS code.

Credentials and endpoint come the usual SDK way: the instance role through IMDS, and ``AWS_ENDPOINT_URL``
(the rehearsal's local API) when set.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, TypeVar, cast

import botocore.session
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError,
    CredentialRetrievalError,
    HTTPClientError,
    NoCredentialsError,
)

from kafka_asg.agent.ports import Cloud, EniView, InstanceState, VolumeView
from kafka_asg.config import CLUSTER_TAG, ROLE_TAG, SLOT_TAG
from kafka_asg.errors import ClaimLost, CloudError, NotFoundError, Unavailable
from kafka_asg.retry import RETRYABLE_AWS_CODES, Retry

logger = logging.getLogger(__name__)

T = TypeVar("T")

CLAIM_LOST_CODES = frozenset({"InvalidNetworkInterface.InUse", "VolumeInUse", "IncorrectState"})
NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "404", "NotFound"})
# AWS allows 256 characters per tag value; the agent keeps one short of it.
MAX_TAG_VALUE = 255


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "Unknown"))


def translate(exc: Exception, what: str, resource: str | None = None) -> Exception:
    """The taxonomy error for a botocore exception raised while doing ``what``."""
    if isinstance(exc, ClientError):
        code = error_code(exc)
        message = str(exc.response.get("Error", {}).get("Message", "")) or str(exc)
        if code in CLAIM_LOST_CODES:
            return ClaimLost(resource or "?", None, f"{what}: {message} ({code})")
        if code.endswith(".NotFound") or code in NOT_FOUND_CODES:
            return NotFoundError(f"{what}: {resource or 'the resource'} does not exist ({code})")
        if code in RETRYABLE_AWS_CODES:
            return Unavailable(f"{what}: {message} ({code})")
        return CloudError(f"{what}: {message}", code)
    if isinstance(exc, (ConnectionError, HTTPClientError)):
        return Unavailable(f"{what}: cannot reach the AWS endpoint: {exc}")
    if isinstance(exc, (NoCredentialsError, CredentialRetrievalError)):
        # On a fresh instance the role's credentials can appear in IMDS a little after boot: retry, bounded.
        return Unavailable(
            f"{what}: no AWS credentials yet ({exc}): is the instance profile attached and IMDS reachable?"
        )
    if isinstance(exc, BotoCoreError):
        return CloudError(f"{what}: {exc}", type(exc).__name__)
    return exc


def _tags(item: Mapping[str, Any]) -> dict[str, str]:
    return {str(t["Key"]): str(t["Value"]) for t in item.get("Tags", item.get("TagSet", [])) or []}


class AwsCloud(Cloud):
    """botocore clients for one region.

    :param region: the instance's region (from IMDS).
    :param endpoint_url: overrides ``AWS_ENDPOINT_URL``; None lets botocore read the environment.
    :param retry: the policy for transient failures of every call.
    """

    def __init__(self, region: str, endpoint_url: str | None = None, *, retry: Retry | None = None) -> None:
        self.retry = retry or Retry(deadline=30.0)
        self.region = region
        self.endpoint_url = endpoint_url
        self._connect()

    def _connect(self) -> None:
        """(Re)build the clients. botocore resolves credentials once, when a client is created: a client made
        while the role's credentials were not yet in IMDS stays without them, so a miss rebuilds the clients."""
        session = botocore.session.Session()
        # botocore asks IMDS for role credentials once with a 1 s timeout by default; a new instance's IMDS can
        # be slower than that (https://docs.aws.amazon.com/sdkref/latest/guide/feature-imds-credentials.html).
        session.set_config_variable("metadata_service_timeout", 5)
        session.set_config_variable("metadata_service_num_attempts", 3)
        config = Config(
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=5,
            read_timeout=20,
            # Every object the agent downloads is checked against its sha256 in manifest.json (loop.py): botocore's
            # own CRC32 of each response body (default "when_supported") was a second pass over Kafka's 59 MB
            # archive on every boot (https://docs.aws.amazon.com/sdkref/latest/guide/feature-dataintegrity.html).
            response_checksum_validation="when_required",
        )

        def client(service: str) -> Any:
            return session.create_client(
                service, region_name=self.region, endpoint_url=self.endpoint_url, config=config
            )

        self.ec2: Any = client("ec2")
        self.autoscaling: Any = client("autoscaling")
        self.s3: Any = client("s3")

    def _call(self, what: str, func: Callable[[], T], resource: str | None = None) -> T:
        def once() -> T:
            try:
                return func()
            except (NoCredentialsError, CredentialRetrievalError) as exc:
                self._connect()
                raise translate(exc, what, resource) from exc
            except (ClientError, BotoCoreError) as exc:
                raise translate(exc, what, resource) from exc

        return self.retry(what, once)

    # ------------------------------------------------------------------------------ ENIs
    def slot_enis(self, cluster: str, subnet_id: str) -> Sequence[EniView]:
        filters = [
            {"Name": "tag:Name", "Values": [f"{cluster}-eni"]},
            {"Name": f"tag:{CLUSTER_TAG}", "Values": [cluster]},
            {"Name": "subnet-id", "Values": [subnet_id]},
        ]

        def describe() -> list[dict[str, Any]]:
            pages = self.ec2.get_paginator("describe_network_interfaces").paginate(Filters=filters)
            return [eni for page in pages for eni in page["NetworkInterfaces"]]

        enis = []
        for raw in self._call("DescribeNetworkInterfaces", describe):
            tags = _tags(raw)
            if not tags.get(SLOT_TAG, "").isdigit():
                logger.warning("%s has no numeric %s tag; ignoring it", raw["NetworkInterfaceId"], SLOT_TAG)
                continue
            attachment = raw.get("Attachment") or {}
            live = attachment.get("Status") in ("attaching", "attached", "detaching")
            enis.append(
                EniView(
                    eni_id=raw["NetworkInterfaceId"],
                    slot=int(tags[SLOT_TAG]),
                    ip=IPv4Address(raw["PrivateIpAddress"]),
                    mac=str(raw["MacAddress"]).lower(),
                    subnet_id=raw["SubnetId"],
                    status=raw["Status"],
                    attached_to=attachment.get("InstanceId") if live else None,
                    attachment_status=attachment.get("Status"),
                )
            )
        return enis

    def attach_eni(self, eni_id: str, instance_id: str, device_index: int) -> None:
        self._call(
            f"AttachNetworkInterface {eni_id} to {instance_id}",
            lambda: self.ec2.attach_network_interface(
                NetworkInterfaceId=eni_id, InstanceId=instance_id, DeviceIndex=device_index
            ),
            eni_id,
        )

    # --------------------------------------------------------------------------- volumes
    def slot_volumes(self, cluster: str, slot: int) -> Sequence[VolumeView]:
        filters = [
            {"Name": f"tag:{CLUSTER_TAG}", "Values": [cluster]},
            {"Name": f"tag:{SLOT_TAG}", "Values": [str(slot)]},
        ]

        def describe() -> list[dict[str, Any]]:
            pages = self.ec2.get_paginator("describe_volumes").paginate(Filters=filters)
            return [vol for page in pages for vol in page["Volumes"]]

        volumes = []
        for raw in self._call("DescribeVolumes", describe):
            tags = _tags(raw)
            attachments = [a for a in raw.get("Attachments", []) if a.get("State") in ("attaching", "attached")]
            att = attachments[0] if attachments else {}
            volumes.append(
                VolumeView(
                    volume_id=raw["VolumeId"],
                    slot=slot,
                    role=tags.get(ROLE_TAG, ""),
                    az=raw["AvailabilityZone"],
                    state=raw["State"],
                    attached_to=att.get("InstanceId"),
                    device=att.get("Device"),
                )
            )
        return volumes

    def attach_volume(self, volume_id: str, instance_id: str, device: str) -> None:
        self._call(
            f"AttachVolume {volume_id} to {instance_id}",
            lambda: self.ec2.attach_volume(VolumeId=volume_id, InstanceId=instance_id, Device=device),
            volume_id,
        )

    # ------------------------------------------------------------------------- instances
    def instance_volumes(self, instance_id: str) -> Mapping[str, str]:
        def describe() -> list[dict[str, Any]]:
            resp = self.ec2.describe_instances(InstanceIds=[instance_id])
            return [i for r in resp["Reservations"] for i in r["Instances"]]

        found = self._call(f"DescribeInstances {instance_id}", describe, instance_id)
        mappings = found[0].get("BlockDeviceMappings", []) if found else []
        return {str(m["DeviceName"]): str(m["Ebs"]["VolumeId"]) for m in mappings if "Ebs" in m}

    def instance_state(self, instance_id: str) -> InstanceState | None:
        def describe() -> list[dict[str, Any]]:
            resp = self.ec2.describe_instances(InstanceIds=[instance_id])
            return [i for r in resp["Reservations"] for i in r["Instances"]]

        try:
            found = self._call(f"DescribeInstances {instance_id}", describe, instance_id)
        except NotFoundError:
            return None
        if not found:
            return None
        return cast(InstanceState, found[0]["State"]["Name"])

    def set_scale_in_protection(self, asg_name: str, instance_id: str, protected: bool) -> None:
        self._call(
            f"SetInstanceProtection {instance_id} in {asg_name}",
            lambda: self.autoscaling.set_instance_protection(
                InstanceIds=[instance_id], AutoScalingGroupName=asg_name, ProtectedFromScaleIn=protected
            ),
            asg_name,
        )

    def report(self, instance_id: str, tags: Mapping[str, str]) -> None:
        tag_list = [{"Key": k, "Value": v[:MAX_TAG_VALUE]} for k, v in sorted(tags.items())]
        self._call(
            f"CreateTags on {instance_id}",
            lambda: self.ec2.create_tags(Resources=[instance_id], Tags=tag_list),
            instance_id,
        )

    # -------------------------------------------------------------------------------- S3
    def get_object(self, bucket: str, key: str) -> bytes:
        def fetch() -> bytes:
            body = self.s3.get_object(Bucket=bucket, Key=key)["Body"]
            try:
                return cast(bytes, body.read())
            finally:
                body.close()

        return self._call(f"GetObject s3://{bucket}/{key}", fetch, f"s3://{bucket}/{key}")

    def download(self, bucket: str, key: str, dest: Path) -> str:
        """Stream the object to ``dest``, hashing it on the way (the caller checks the sha256 and renames the
        file into place)."""
        dest.parent.mkdir(parents=True, exist_ok=True)

        def fetch() -> str:
            digest = hashlib.sha256()
            body = self.s3.get_object(Bucket=bucket, Key=key)["Body"]
            try:
                with dest.open("wb") as fh:
                    for chunk in iter(lambda: body.read(1 << 20), b""):
                        digest.update(chunk)
                        fh.write(chunk)
            finally:
                body.close()
            return digest.hexdigest()

        return self._call(f"GetObject s3://{bucket}/{key}", fetch, f"s3://{bucket}/{key}")
