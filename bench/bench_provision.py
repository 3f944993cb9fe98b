"""Benchmark: API calls and wall time of ``up`` and of a no-op ``up`` for 3, 9 and 30 slots, and ``plan``
for 3 slots, against moto in-process. Not a test. Writes bench/results/provision.json, prints a table.

    .venv/bin/python bench/bench_provision.py
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import replace
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import boto3
from moto import mock_aws

from kafka_asg.config import AsgSize, ClusterConfig, Slot, reserved_addresses, seed_config
from kafka_asg.provision.apply import plan, up
from kafka_asg.provision.clients import aws_clients
from kafka_asg.provision.inputs import ProvisionInputs

RESULTS = Path(__file__).parent / "results" / "provision.json"
PLAN_RUNS = 5


def cluster(slots: int) -> ClusterConfig:
    """The seed's VPC and 3 subnets with ``slots`` slots spread over them round-robin. The ASG is created at
    desired 0: launching instances is the region's work, not provisioning's (and 30 fixed IPs leave the /28s
    no room for instance addresses)."""
    seed = seed_config()
    free = {s.cidr: [ip for ip in s.cidr if ip not in reserved_addresses(s.cidr)] for s in seed.subnets}
    out: list[Slot] = []
    for number in range(1, slots + 1):
        subnet = seed.subnets[(number - 1) % len(seed.subnets)]
        ip: IPv4Address = free[subnet.cidr].pop(0)
        out.append(Slot(number=number, az=subnet.az, ip=ip, subnet=subnet))
    return replace(seed, slots=tuple(out), asg=AsgSize(min=0, desired=0, max=slots))


def measure(slots: int, inputs: ProvisionInputs) -> dict[str, Any]:
    cfg = cluster(slots)
    with mock_aws():
        ec2 = boto3.client("ec2", region_name=cfg.region)
        vpc = ec2.create_vpc(CidrBlock=str(cfg.vpc_cidr))["Vpc"]["VpcId"]
        for subnet in cfg.subnets:
            ec2.create_subnet(VpcId=vpc, CidrBlock=str(subnet.cidr), AvailabilityZone=subnet.az)
        clients = aws_clients(cfg)
        row: dict[str, Any] = {"slots": slots}
        for phase in ("up", "noop_up"):
            clients.counter.reset()
            start = time.perf_counter()
            up(cfg, clients, inputs, lambda _: None)
            row[f"{phase}_seconds"] = round(time.perf_counter() - start, 3)
            row[f"{phase}_calls"] = clients.counter.total
            row[f"{phase}_mutating_calls"] = sum(clients.counter.mutating.values())
        if slots == 3:
            times = []
            for _ in range(PLAN_RUNS):
                start = time.perf_counter()
                assert plan(cfg, clients, inputs).is_empty
                times.append(time.perf_counter() - start)
            row["plan_seconds_median"] = round(sorted(times)[len(times) // 2], 3)
        return row


def main() -> None:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    for var in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_PROFILE"):
        os.environ.pop(var, None)
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "archive.tgz"
        archive.write_bytes(os.urandom(1 << 20))  # 1 MiB stands in for a server archive
        inputs = ProvisionInputs(user_data="#!/bin/sh\ntrue\n", objects={"archives/kafka_2.13-3.9.2.tgz": archive})
        rows = [measure(n, inputs) for n in (3, 9, 30)]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"backend": "moto in-process", "rows": rows}, indent=2) + "\n")
    print("| slots | up calls (mutating) | up time | no-op up calls (mutating) | no-op up time | plan time |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        plan_time = f"{r['plan_seconds_median']:.3f} s" if "plan_seconds_median" in r else "-"
        print(
            f"| {r['slots']} | {r['up_calls']} ({r['up_mutating_calls']}) | {r['up_seconds']:.3f} s "
            f"| {r['noop_up_calls']} ({r['noop_up_mutating_calls']}) | {r['noop_up_seconds']:.3f} s | {plan_time} |"
        )


if __name__ == "__main__":
    main()
