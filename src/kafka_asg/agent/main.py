"""``kafka-asg-agent``: the node agent's command line (the user data runs ``kafka-asg-agent.pyz run ...``).

- ``run --bucket B --region R --cluster C [--root /] [--once]``: fetch ``cluster.json``, the base configs
  and ``manifest.json`` from the bucket, then run the loop (one cycle with ``--once``).
- ``health``: print ``state: reason``; exit 0 only when serving (and the loop ran recently).
- ``status [--json]``: the last ``status.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from kafka_asg.agent.concurrency import preload, results_at_once
from kafka_asg.agent.ports import Cloud
from kafka_asg.agent.status import DEFAULT_MAX_AGE, health, read_status
from kafka_asg.errors import ConfigError, KafkaAsgError, NotFoundError
from kafka_asg.fsutil import atomic_write
from kafka_asg.paths import AgentPaths
from kafka_asg.retry import Retry

logger = logging.getLogger(__name__)

# How long ``run`` keeps trying to read its inputs from S3 before giving up (the service manager restarts it).
STARTUP_DEADLINE = 600.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kafka-asg-agent", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="claim this instance's slot and run ZooKeeper + Kafka")
    run.add_argument("--bucket", required=True, help="the cluster bucket (cluster.json, base configs, archives)")
    run.add_argument("--region", required=True)
    run.add_argument("--cluster", required=True, help="the cluster name; must match cluster.json")
    run.add_argument("--root", type=Path, default=Path("/"), help="root of every local path (default /)")
    run.add_argument("--once", action="store_true", help="run one cycle, print its sentence, exit")
    run.add_argument("--endpoint-url", default=None, help="AWS API endpoint (default: AWS_ENDPOINT_URL or AWS)")
    run.add_argument("--imds-url", default=None, help="IMDS base URL (default: KAFKA_ASG_IMDS_URL or 169.254.169.254)")

    for name, text in (("health", "exit 0 only when serving"), ("status", "print the last status.json")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--root", type=Path, default=Path("/"))
        p.add_argument("--max-age", type=float, default=DEFAULT_MAX_AGE, help="seconds before a status is stale")
        if name == "status":
            p.add_argument("--json", action="store_true")
    return parser


def fetch_inputs(cloud: Cloud, bucket: str, cluster: str, paths: AgentPaths) -> Path:
    """Download cluster.json, the base configs and manifest.json to ``config_dir/base``; check the base
    configs' sha256 against the manifest when it lists them. Returns the directory."""
    base = paths.config_dir / "base"
    manifest_raw = cloud.get_object(bucket, "manifest.json")  # first: it also fetches the role's credentials
    files = json.loads(manifest_raw).get("files", {})
    keys = ("cluster.json", "zookeeper.config", "kafka.config")
    # Side by side: one round trip instead of three at every agent start.
    got = results_at_once({key: partial(cloud.get_object, bucket, key) for key in keys})
    for key in keys:
        data = got[key]
        entry = files.get(key)
        if entry and hashlib.sha256(data).hexdigest() != entry.get("sha256"):
            raise ConfigError(
                [f"s3://{bucket}/{key} does not match its sha256 in manifest.json: re-run `kafka-asg up`"]
            )
        atomic_write(base / key, data, durable=False)  # fetched again at every start: no fsync
    atomic_write(base / "manifest.json", manifest_raw, durable=False)
    doc = json.loads((base / "cluster.json").read_text())
    if doc.get("name") != cluster:
        raise ConfigError(
            [f"s3://{bucket}/cluster.json is for cluster {doc.get('name')!r}, not {cluster!r}: check --cluster"]
        )
    return base


def cmd_run(args: argparse.Namespace) -> int:
    # Imported here so ``health`` and ``status`` stay quick: they import only what reads the status file. The
    # loop's modules (30 ms of imports) load in a thread while this one waits for IMDS and S3.
    preload(
        "kafka_asg.agent.loop", "kafka_asg.agent.linux", "kafka_asg.agent.servers", "kafka_asg.config", name="import"
    )
    from kafka_asg.agent.aws import AwsCloud, CredentialChain
    from kafka_asg.agent.imds import HttpImds
    from kafka_asg.agent.reads import READS_MAX_AGE

    paths = AgentPaths(root=args.root)
    # Nothing from the loop's modules before the inputs are read: waiting here for the thread importing them would
    # put those imports back in front of the first request.
    imds = HttpImds(args.imds_url, lifecycle_max_age=READS_MAX_AGE)
    cloud = AwsCloud(args.region, CredentialChain(imds), endpoint_url=args.endpoint_url)
    startup = Retry(deadline=STARTUP_DEADLINE, delay=1.0, max_delay=15.0)
    try:
        base = startup(
            "reading the cluster's inputs from S3", lambda: fetch_inputs(cloud, args.bucket, args.cluster, paths)
        )
    except NotFoundError as exc:
        raise ConfigError([f"{exc}: has `kafka-asg up` uploaded the cluster's files to s3://{args.bucket}?"]) from exc
    from kafka_asg.agent.linux import LinuxHost
    from kafka_asg.agent.loop import Agent, AgentSettings
    from kafka_asg.agent.servers import ProcessServices
    from kafka_asg.config import config_from_document

    settings = AgentSettings()

    cfg = config_from_document(
        json.loads((base / "cluster.json").read_text()),
        zookeeper_config=base / "zookeeper.config",
        kafka_config=base / "kafka.config",
    )
    agent = Agent(
        cfg=cfg,
        imds=imds,
        cloud=cloud,
        host=LinuxHost(paths, reads_max_age=settings.reads_max_age),
        services=ProcessServices(paths),
        paths=paths,
        settings=settings,
        manifest=(base / "manifest.json").read_bytes(),
    )
    if args.once:
        print(agent.run_cycle())
        agent.report_tags()  # a boot step defers its tags to the next cycle, and there is none
        return 0
    return agent.run_forever()


def cmd_health(args: argparse.Namespace) -> int:
    result = health(read_status(AgentPaths(root=args.root).status_file), time.time(), args.max_age)
    print(result.line)
    return 0 if result.healthy else 1


def cmd_status(args: argparse.Namespace) -> int:
    path = AgentPaths(root=args.root).status_file
    status = read_status(path)
    if status is None:
        print(f"no status yet ({path})", file=sys.stderr)
        return 1
    if args.json:
        print(status.to_json(), end="")
        return 0
    result = health(status, time.time(), args.max_age)
    print(f"state:      {status.state}")
    print(f"reason:     {status.reason}")
    print(f"instance:   {status.instance_id}")
    print(f"slot:       {status.slot if status.slot is not None else '-'}")
    print(f"zookeeper:  {status.zk_mode}")
    print(f"broker:     {'registered' if status.broker_registered else 'not registered'}")
    print(f"healthy:    {'yes' if result.healthy else 'no'} ({result.line})")
    return 0


COMMANDS = {"run": cmd_run, "health": cmd_health, "status": cmd_status}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("kazoo").setLevel(logging.WARNING)
    try:
        return COMMANDS[args.command](args)
    except KafkaAsgError as exc:
        print(f"kafka-asg-agent: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
