"""The pure diff: observed facts -> expected changes, each with its reason (no AWS, no moto)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from kafka_asg.config import VOLUME_ROLES, ClusterConfig, seed_config
from kafka_asg.provision.inputs import ProvisionInputs
from kafka_asg.provision.plan import (
    MAINTENANCE_POLICY,
    AsgState,
    BucketState,
    Desired,
    EniState,
    IamState,
    LaunchTemplateState,
    Network,
    Observed,
    SecurityGroupState,
    VolumeState,
    desired_state,
    diff,
    launch_template_description,
)

SUBNETS = {"10.0.0.48/28": "subnet-a", "10.0.0.16/28": "subnet-b", "10.0.0.32/28": "subnet-c"}


@pytest.fixture
def cfg() -> ClusterConfig:
    return seed_config()


@pytest.fixture
def desired(cfg: ClusterConfig, tmp_path: Path) -> Desired:
    archive = tmp_path / "a.tgz"
    archive.write_bytes(b"a")
    inputs = ProvisionInputs(user_data="#!/bin/sh\n", objects={"archives/a.tgz": archive})
    return desired_state(cfg, inputs, account_id="123456789012", partition="aws")


def in_sync(cfg: ClusterConfig, desired: Desired) -> Observed:
    """Observed facts that match ``desired`` exactly."""
    return Observed(
        account_id="123456789012",
        partition="aws",
        network=Network("vpc-1", SUBNETS),
        security_group=SecurityGroupState("sg-1", desired.rules),
        enis={
            s.number: EniState(
                f"eni-{s.number}",
                s.number,
                str(s.ip),
                SUBNETS[str(s.subnet.cidr)],
                frozenset({"sg-1"}),
                "available",
                cfg.eni_name,
            )
            for s in cfg.slots
        },
        volumes={
            (s.number, r): VolumeState(f"vol-{s.number}{r}", s.number, r, s.az, "available")
            for s in cfg.slots
            for r in VOLUME_ROLES
        },
        iam=IamState(True, desired.policy, True, frozenset({cfg.role_name})),
        bucket=BucketState(True, True, True, {o.key: o.sha256 for o in desired.objects}),
        launch_template=LaunchTemplateState("lt-1", 1, launch_template_description(desired.launch_template_digest)),
        asg=AsgState(
            2,
            3,
            4,
            frozenset(SUBNETS.values()),
            cfg.launch_template_name,
            "$Latest",
            MAINTENANCE_POLICY,
            frozenset({"AZRebalance"}),
            {"kafka-asg:cluster": cfg.name},
        ),
    )


def test_in_sync_is_empty(cfg: ClusterConfig, desired: Desired) -> None:
    plan = diff(in_sync(cfg, desired), desired)
    assert plan.is_empty, plan.render_text()
    assert "No changes" in plan.render_text()
    assert plan.to_json()["changes"] == []


def test_nothing_exists(cfg: ClusterConfig, desired: Desired) -> None:
    observed = Observed("123456789012", "aws", Network("vpc-1", SUBNETS))
    plan = diff(observed, desired)
    counts: dict[str, int] = {}
    for change in plan.changes:
        counts[change.kind] = counts.get(change.kind, 0) + 1
        assert change.action in ("create", "update")
    doc = json.loads(json.dumps(plan.to_json()))
    assert len(doc["changes"]) == len(plan.changes) and all(c["reason"] for c in doc["changes"])
    assert plan.render_text().endswith("Plan: 24 to create, 3 to update (0 unchanged).")
    assert counts == {
        "bucket": 1,
        "bucket-settings": 1,
        "object": 5,  # zookeeper.config, kafka.config, the archive, cluster.json, manifest.json
        "security-group": 1,
        "sg-rules": 1,
        "iam-role": 1,
        "iam-policy": 1,
        "instance-profile": 1,
        "eni": 3,
        "volume": 9,
        "launch-template": 1,
        "asg": 1,
        "asg-processes": 1,
    }


def _one(observed: Observed, desired: Desired) -> tuple[str, str, str]:
    plan = diff(observed, desired)
    assert len(plan.changes) == 1, plan.render_text()
    c = plan.changes[0]
    return c.kind, c.action, c.reason


def test_eni_with_wrong_ip_is_replaced(cfg: ClusterConfig, desired: Desired) -> None:
    observed = in_sync(cfg, desired)
    enis = dict(observed.enis)
    enis[2] = replace(enis[2], ip="10.0.0.22")
    assert _one(replace(observed, enis=enis), desired) == (
        "eni",
        "replace",
        "has 10.0.0.22 in subnet-b, want 10.0.0.21 in subnet-b",
    )


def test_eni_without_name_tag_is_updated(cfg: ClusterConfig, desired: Desired) -> None:
    observed = in_sync(cfg, desired)
    enis = dict(observed.enis)
    enis[1] = replace(enis[1], name_tag=None)
    assert _one(replace(observed, enis=enis), desired) == ("eni", "update", "Name tag is None")


def test_volume_in_wrong_az_is_left_alone(cfg: ClusterConfig, desired: Desired) -> None:
    observed = in_sync(cfg, desired)
    volumes = dict(observed.volumes)
    volumes[(1, "zk-data")] = replace(volumes[(1, "zk-data")], az="eu-west-1b")
    plan = diff(replace(observed, volumes=volumes), desired)
    assert plan.is_empty
    assert any("left alone (holds data)" in n.reason for n in plan.noops)


def test_changed_object_is_uploaded(cfg: ClusterConfig, desired: Desired) -> None:
    observed = in_sync(cfg, desired)
    shas = dict(observed.bucket.object_sha256)
    shas["kafka.config"] = "0" * 64
    kind, action, reason = _one(replace(observed, bucket=replace(observed.bucket, object_sha256=shas)), desired)
    assert (kind, action) == ("object", "update") and reason.startswith("sha256 differs (have 000000000000")


def test_edited_policy_is_put_back(cfg: ClusterConfig, desired: Desired) -> None:
    observed = in_sync(cfg, desired)
    iam = replace(
        observed.iam,
        policy={"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "ec2:*", "Resource": "*"}]},
    )
    assert _one(replace(observed, iam=iam), desired) == (
        "iam-policy",
        "update",
        "policy document differs from the generated one",
    )


def test_launch_before_terminate_policy_is_corrected(cfg: ClusterConfig, desired: Desired) -> None:
    observed = in_sync(cfg, desired)
    assert observed.asg is not None
    asg = replace(observed.asg, maintenance_policy={"MinHealthyPercentage": 100, "MaxHealthyPercentage": 200})
    kind, action, reason = _one(replace(observed, asg=asg), desired)
    assert (kind, action) == ("asg", "update") and "want terminate-before-launch" in reason


def test_resumed_az_rebalance_is_suspended_again(cfg: ClusterConfig, desired: Desired) -> None:
    observed = in_sync(cfg, desired)
    assert observed.asg is not None
    asg = replace(observed.asg, suspended=frozenset())
    assert _one(replace(observed, asg=asg), desired)[:2] == ("asg-processes", "update")


def test_recreated_group_refreshes_enis_and_template(cfg: ClusterConfig, desired: Desired) -> None:
    observed = replace(in_sync(cfg, desired), security_group=None)
    kinds = [(c.kind, c.action) for c in diff(observed, desired).changes]
    assert kinds[:2] == [("security-group", "create"), ("sg-rules", "update")]
    assert kinds.count(("eni", "update")) == 3
    assert ("launch-template", "update") in kinds


def test_per_instance_mode_creates_no_volumes(cfg: ClusterConfig, tmp_path: Path) -> None:
    cfg = replace(cfg, volumes="per-instance")
    inputs = ProvisionInputs(user_data="", objects={})
    desired = desired_state(cfg, inputs, account_id="1", partition="aws")
    plan = diff(Observed("1", "aws", Network("vpc-1", SUBNETS)), desired)
    assert not [c for c in plan.changes if c.kind == "volume"]
