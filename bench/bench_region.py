"""Benchmark the local region (needs root): daemon start time, time from RunInstances to user data starting,
daemon RSS idle and with instances, RSS per idle instance. Not a test. Writes bench/results/region.json.

    sudo .venv/bin/python bench/bench_region.py [instances]

``boot_delay`` is 0 here, so the launch time is the machinery's own cost (namespaces, overlay root, user
data start); the rehearsal adds its configured pending time on top.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import boto3

from kafka_asg.config import seed_config
from kafka_asg.local.commands import ensure_region, make_hosts, stop_region
from kafka_asg.local.daemon import memory_rss_kib
from kafka_asg.local.strict import StrictOptions
from kafka_asg.paths import RegionPaths

RESULTS = Path(__file__).parent / "results" / "region.json"
# The first thing user data does: record when it started (wall clock, comparable with this process's).
USER_DATA = "#!/bin/sh\ndate +%s.%N > /var/tmp/user-data-started\nexec sleep 3600\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def netns_pids(name: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, check=False).stdout
    return [int(p) for p in out.split()]


def rss_of(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):  # the process may have exited meanwhile
            total += memory_rss_kib(pid)
    return total


def main() -> int:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    os.environ.setdefault("KAFKA_ASG_VPC_NETNS", "kasg-bench-vpc")
    cfg = dataclasses.replace(seed_config(), name="bench")
    paths = RegionPaths(Path(tempfile.mkdtemp(prefix="kasg-bench-")) / "region")
    result: dict[str, Any] = {"instances": count, "boot_delay": 0.0}
    try:
        t0 = time.monotonic()
        info = ensure_region(cfg, paths, options=StrictOptions(boot_delay=0.0, detach_delay=1.0), port=free_port())
        result["daemon_start_seconds"] = round(time.monotonic() - t0, 3)
        time.sleep(2)
        result["daemon_rss_idle_mib"] = round(memory_rss_kib(info.pid) / 1024, 1)
        ec2 = boto3.client(
            "ec2",
            endpoint_url=info.endpoint_url,
            region_name=info.region,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        subnets = sorted(
            s["SubnetId"]
            for s in ec2.describe_subnets(Filters=[{"Name": "tag:kafka-asg:cluster", "Values": ["bench"]}])["Subnets"]
        )
        hosts = make_hosts(paths)
        launches: list[float] = []
        ids: list[str] = []
        for n in range(count):
            started = time.time()
            out = ec2.run_instances(
                ImageId="ami-local",
                MinCount=1,
                MaxCount=1,
                SubnetId=subnets[n % len(subnets)],
                UserData=USER_DATA,  # boto3 base64-encodes it
            )
            iid = out["Instances"][0]["InstanceId"]
            ids.append(iid)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if iid in hosts.live_instances():
                    got = hosts.exec_in(iid, ["cat", "/var/tmp/user-data-started"], timeout=10)
                    if got.returncode == 0 and got.stdout.strip():
                        launches.append(float(got.stdout) - started)
                        break
                time.sleep(0.05)
        result["run_instances_to_user_data_seconds"] = [round(x, 3) for x in launches]
        result["run_instances_to_user_data_median"] = (
            round(sorted(launches)[len(launches) // 2], 3) if launches else None
        )
        time.sleep(3)
        per_instance = [rss_of(netns_pids(i)) for i in ids]
        result["instance_process_rss_kib"] = per_instance
        result["daemon_rss_with_instances_mib"] = round(memory_rss_kib(info.pid) / 1024, 1)
        result["daemon_rss_per_instance_kib"] = round(
            (result["daemon_rss_with_instances_mib"] - result["daemon_rss_idle_mib"]) * 1024 / max(1, count)
        )
    finally:
        stop_region(paths)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
