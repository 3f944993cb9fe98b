"""The operator's commands that span the parts: ``up``, ``down``, ``status``, ``verify``.

``up`` = validate → (``--local``: start the local region) → build or reuse the artifacts → provision → (``--local``:
wait until every slot serves, ``verify``, print ``status``). Each phase is timed; ``up --local`` writes the
timings next to the region's state for the benchmark.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kafka_asg.config import ClusterConfig, load_config
from kafka_asg.errors import Unavailable
from kafka_asg.fsutil import atomic_write
from kafka_asg.paths import RegionPaths
from kafka_asg.provision.inputs import ProvisionInputs
from kafka_asg.status import Row, build_rows, observe, render_table, rows_json
from kafka_asg.verify import ProbeRunner, VerifyFailed, host_runner, verify

logger = logging.getLogger(__name__)

CLUSTER_TIMEOUT = 900.0  # seconds for a cold `up --local` to reach "every slot serving"


def say(message: str) -> None:
    print(message, flush=True)


def gather_inputs(cfg: ClusterConfig, *, build: bool = True, progress: Callable[[str], None] = say) -> ProvisionInputs:
    """User data and the large bucket objects (server archives, agent zipapp)."""
    from kafka_asg.artifacts import ensure_artifacts
    from kafka_asg.userdata import render_user_data

    artifacts = ensure_artifacts(cfg, build=build, progress=progress)
    return ProvisionInputs(user_data=render_user_data(cfg), objects=artifacts.objects)


def _config(args: argparse.Namespace) -> ClusterConfig:
    path = Path(args.config) if args.config else None
    if path is None and not Path("cluster.toml").exists() and getattr(args, "local", False):
        return load_config(None, local=True)
    return load_config(path or Path("cluster.toml"), local=getattr(args, "local", False))


def _clients(cfg: ClusterConfig, local: bool) -> Any:
    from kafka_asg.provision.clients import aws_clients

    if not local:
        return aws_clients(cfg)
    from kafka_asg.local.commands import region_info

    info = region_info()
    if info is None:
        raise Unavailable("the local region is not running: `kafka-asg up --local` starts it")
    return _local_clients(cfg, info)


def _local_clients(cfg: ClusterConfig, info: Any) -> Any:
    """Clients for the local region, with its dummy credentials (what `kafka-asg local env` exports)."""
    from kafka_asg.provision.clients import aws_clients

    os.environ.update(info.env())
    return aws_clients(cfg, endpoint_url=info.endpoint_url)


class Phases:
    """Wall time per phase of a command, for the progress output and the benchmark."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        say(f"==> {name}")
        try:
            yield
        finally:
            self.seconds[name] = round(time.monotonic() - start, 2)
            say(f"    {name}: {self.seconds[name]:.1f}s")


def cmd_up(args: argparse.Namespace) -> int:
    from kafka_asg.provision.apply import up

    cfg = _config(args)  # validates: nothing below runs on an invalid file
    phases = Phases()
    if args.local:
        from kafka_asg.local.commands import ensure_region

        with phases.phase("local region"):
            info = ensure_region(cfg, progress=say)
        clients = _local_clients(cfg, info)
    else:
        clients = _clients(cfg, local=False)
    with phases.phase("artifacts"):
        inputs = gather_inputs(cfg, build=True)
    with phases.phase("provision"):
        up(cfg, clients, inputs, progress=say)
    if not args.local or args.no_wait:
        return 0
    runner = bastion_runner(cfg)
    with phases.phase("cluster serving"):
        wait_for_cluster(cfg, clients.ec2, timeout=CLUSTER_TIMEOUT)
    with phases.phase("verify"):
        verify(cfg, runner, say=lambda m: say("    " + m))
    atomic_write(RegionPaths.default().root / "up-timings.json", json.dumps(phases.seconds, indent=2))
    say("")
    say(render_table(current_rows(cfg, clients.ec2)))
    say("")
    say("phases: " + ", ".join(f"{k} {v:.1f}s" for k, v in phases.seconds.items()))
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from kafka_asg.provision.apply import down

    cfg = _config(args)
    if args.local:
        from kafka_asg.local.commands import region_info, stop_region

        if region_info() is not None:
            down(cfg, _clients(cfg, local=True), delete_data=args.delete_data, progress=say)
        stop_region()  # also cleans up after a crashed region
        say("local region removed")
        return 0
    down(cfg, _clients(cfg, local=False), delete_data=args.delete_data, progress=say)
    return 0


def current_rows(cfg: ClusterConfig, ec2: Any) -> list[Row]:
    enis, instances = observe(cfg, ec2)
    return build_rows(enis, instances)


def wait_for_cluster(cfg: ClusterConfig, ec2: Any, *, timeout: float, poll: float = 2.0) -> list[Row]:
    """Until every slot's holder reports serving (ZooKeeper leader/follower, broker registered)."""
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        rows = current_rows(cfg, ec2)
        slot_rows = [r for r in rows if r.slot is not None]
        summary = ", ".join(f"slot {r.slot}: {r.agent}/{r.zk_mode}/{r.broker}" for r in slot_rows)
        if summary != last:
            say(f"    {summary}")
            last = summary
        if slot_rows and all(r.is_serving for r in slot_rows):
            return rows
        if time.monotonic() > deadline:
            raise Unavailable(f"cluster not serving after {timeout:.0f}s: {summary}")
        time.sleep(poll)


def bastion_runner(cfg: ClusterConfig) -> ProbeRunner:
    from kafka_asg.local.commands import bastion_exec
    from kafka_asg.verify import Probe

    def run(argv: Any, timeout: float) -> Probe:
        try:
            done = bastion_exec(cfg, list(argv), timeout=timeout)
        except Exception as exc:  # a probe that cannot run is a failed probe, with the reason
            return Probe(124, "", str(exc))
        return Probe(done.returncode, done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace"))

    return run


def cmd_status(args: argparse.Namespace) -> int:
    cfg = _config(args)
    rows = current_rows(cfg, _clients(cfg, local=args.local).ec2)
    say(rows_json(rows) if args.json else render_table(rows))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    cfg = _config(args)
    runner = bastion_runner(cfg) if args.local else host_runner
    try:
        verify(cfg, runner, messages=args.messages)
    except VerifyFailed as exc:
        print(f"verify: FAILED: {exc}", file=sys.stderr)
        return 1
    say("verify: OK")
    return 0
