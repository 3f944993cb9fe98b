"""``kafka-asg local ...`` and the public API the operator uses to get a local region.

The daemon (``local serve``) runs detached (``setsid``) with its pid in ``RegionPaths.pid_file``, its log
in ``RegionPaths.log_file``; it writes ``RegionPaths.endpoint_file`` once it serves. Faults that need the
daemon go to its admin path on the operator endpoint (127.0.0.1 only).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kafka_asg.config import SLOT_TAG, ClusterConfig
from kafka_asg.errors import ConfigError, HostError, NotFoundError, Unavailable
from kafka_asg.fsutil import atomic_write
from kafka_asg.paths import RegionPaths
from kafka_asg.retry import wait_until

if TYPE_CHECKING:
    from kafka_asg.local.hosts import LinuxHosts

logger = logging.getLogger(__name__)

START_DEADLINE = 120.0
STOP_DEADLINE = 60.0
DUMMY_KEY = "testing"  # moto accepts any credentials; the local region has no account


@dataclass(frozen=True)
class RegionInfo:
    endpoint_url: str  # for the operator, on 127.0.0.1
    instance_endpoint_url: str  # what instances use (the VPC gateway)
    region: str
    pid: int
    bastion: str  # the bastion namespace name

    def env(self) -> dict[str, str]:
        """Environment for the AWS CLI / boto3 against the local region."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ACCESS_KEY_ID": DUMMY_KEY,
            "AWS_SECRET_ACCESS_KEY": DUMMY_KEY,
        }


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (our own exited child not yet reaped) is not alive.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _read_pid(paths: RegionPaths) -> int | None:
    try:
        return int(paths.pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def region_info(paths: RegionPaths | None = None) -> RegionInfo | None:
    """The running local region, or None when there is none (or its daemon died)."""
    paths = paths or RegionPaths.default()
    try:
        doc = json.loads(paths.endpoint_file.read_text())
    except (OSError, ValueError):
        return None
    info = RegionInfo(
        endpoint_url=str(doc["endpoint_url"]),
        instance_endpoint_url=str(doc["instance_endpoint_url"]),
        region=str(doc["region"]),
        pid=int(doc["pid"]),
        bastion=str(doc["bastion"]),
    )
    return info if _alive(info.pid) else None


def _no_progress(message: str) -> None:
    logger.info("%s", message)


def ensure_region(
    cfg: ClusterConfig,
    paths: RegionPaths | None = None,
    progress: Callable[[str], None] = _no_progress,
    *,
    options: Any = None,
    port: int | None = None,
) -> RegionInfo:
    """Start the local region for ``cfg`` unless it already runs; wait until it serves.

    :param options: a :class:`~kafka_asg.local.strict.StrictOptions` (delays), default AWS-like.
    :raises Unavailable: the daemon did not come up in time (its log is named in the message).
    """
    from kafka_asg.local.daemon import SPEC_FILE, RegionSpec

    paths = paths or RegionPaths.default()
    info = region_info(paths)
    if info is not None:
        return info
    if paths.pid_file.exists() or paths.journal_file.exists():
        progress("cleaning up after a previous local region that is gone")
        stop_region(paths)
    spec = RegionSpec.from_config(cfg, port=port, options=options)
    paths.root.mkdir(parents=True, exist_ok=True)
    atomic_write(paths.root / SPEC_FILE, spec.to_json())
    progress(f"starting the local region {spec.region} on 127.0.0.1:{spec.port}")
    env = {**os.environ, "KAFKA_ASG_STATE_DIR": str(paths.root)}
    with open(paths.log_file, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kafka_asg.cli", "local", "serve"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # setsid: the daemon outlives the CLI and its terminal
            close_fds=True,
        )
    atomic_write(paths.pid_file, f"{proc.pid}\n")

    def served() -> RegionInfo | None:
        if proc.poll() is not None:
            raise Unavailable(f"the local region daemon exited with {proc.returncode}; see {paths.log_file}")
        return region_info(paths)

    try:
        info = wait_until("the local region to serve", served, deadline=START_DEADLINE, interval=0.2)
    except Unavailable as exc:
        raise Unavailable(f"{exc}; see {paths.log_file}") from exc
    progress(f"local region serves on {info.endpoint_url} (pid {info.pid})")
    return info


def stop_region(paths: RegionPaths | None = None) -> None:
    """Stop the daemon (SIGTERM; its teardown cleans the machine); after a crash clean up directly. Then
    remove the state directory."""
    paths = paths or RegionPaths.default()
    pid = _read_pid(paths)
    if pid is not None and _alive(pid):
        os.kill(pid, signal.SIGTERM)
        try:
            wait_until("the local region daemon to exit", lambda: not _alive(pid), deadline=STOP_DEADLINE)
        except Unavailable:
            logger.warning("daemon %d did not exit in %.0fs; killing it", pid, STOP_DEADLINE)
            os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)
    if paths.root.exists():
        # Also after a clean stop: teardown is idempotent and finds leftovers by journal and name.
        _teardown_hosts(paths)
        _remove_tree(paths.root)


def _teardown_hosts(paths: RegionPaths) -> None:
    try:
        hosts = make_hosts(paths)
    except ImportError:  # the Linux machinery is not installed: nothing of it can exist
        return
    hosts.teardown()


def _remove_tree(root: Path) -> None:
    import shutil

    # Never follow mounts out of the state dir: teardown unmounted everything; refuse if something remains.
    mounts = Path("/proc/self/mounts").read_text().split("\n")
    still = [line.split()[1] for line in mounts if line and line.split()[1].startswith(str(root) + "/")]
    if still:
        raise HostError(f"not removing {root}: still mounted: {', '.join(still)}; run `kafka-asg local stop` again")
    shutil.rmtree(root, ignore_errors=True)


def make_hosts(paths: RegionPaths) -> LinuxHosts:
    from kafka_asg.local.hosts import LinuxHosts

    # KAFKA_ASG_VPC_NETNS lets tests run a region next to another one on a shared machine.
    vpc_netns = os.environ.get("KAFKA_ASG_VPC_NETNS")
    return LinuxHosts(paths, vpc_netns=vpc_netns) if vpc_netns else LinuxHosts(paths)


def bastion_exec(
    cfg: ClusterConfig, argv: Sequence[str], timeout: float | None = None, paths: RegionPaths | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` in the bastion namespace ``<cluster>-bastion`` and wait for it."""
    paths = paths or RegionPaths.default()
    return make_hosts(paths).exec_in(f"{cfg.name}-bastion", list(argv), timeout=timeout)


# ---------------------------------------------------------------------------------------- faults


def _admin(info: RegionInfo, action: str, target: str) -> str:
    req = urllib.request.Request(
        info.endpoint_url + "/_kafka_asg/fault",
        data=json.dumps({"action": action, "target": target}).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    # The operator endpoint is on loopback; never through a proxy.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=30) as resp:
            return str(json.loads(resp.read())["message"])
    except urllib.error.HTTPError as exc:
        raise ConfigError([json.loads(exc.read() or b"{}").get("message", str(exc))]) from exc
    except OSError as exc:
        raise Unavailable(f"the local region daemon does not answer on {info.endpoint_url}: {exc}") from exc


def region_clients(info: RegionInfo) -> tuple[Any, Any]:
    """EC2 and Auto Scaling clients for the local region, with its dummy credentials."""
    import boto3

    session = boto3.session.Session(
        aws_access_key_id=DUMMY_KEY, aws_secret_access_key=DUMMY_KEY, region_name=info.region
    )
    return (
        session.client("ec2", endpoint_url=info.endpoint_url),
        session.client("autoscaling", endpoint_url=info.endpoint_url),
    )


def resolve_instance(info: RegionInfo, target: str, cluster: str | None = None) -> str:
    """``i-...`` as is; a slot number -> the instance holding the slot's ENI (tag kafka-asg:slot)."""
    if target.startswith("i-"):
        return target
    if not target.isdigit():
        raise ConfigError([f"{target!r} is neither a slot number nor an instance id (i-...)"])
    ec2, _ = region_clients(info)
    filters = [{"Name": f"tag:{SLOT_TAG}", "Values": [target]}]
    if cluster:
        filters.append({"Name": "tag:kafka-asg:cluster", "Values": [cluster]})
    for eni in ec2.describe_network_interfaces(Filters=filters)["NetworkInterfaces"]:
        holder = eni.get("Attachment", {}).get("InstanceId")
        if holder:
            return str(holder)
    raise NotFoundError(f"no instance holds slot {target}'s ENI now (is the slot's node booting?)")


def _need(info: RegionInfo | None) -> RegionInfo:
    if info is None:
        raise NotFoundError("no local region runs; start it with `kafka-asg local start`")
    return info


def _config(args: argparse.Namespace) -> ClusterConfig:
    from kafka_asg.config import load_config

    return load_config(Path(args.config) if args.config else None, local=True)


def cmd_local(args: argparse.Namespace) -> int:
    action: str = args.action
    target: list[str] = list(getattr(args, "rest", None) or [])
    if target[:1] == ["--"]:  # argparse may keep the separator of `local exec -- CMD`
        target = target[1:]
    paths = RegionPaths.default()
    if action == "serve":
        return _serve(args, paths)
    if action == "start":
        started = ensure_region(_config(args), paths, progress=print)
        print(f"local region {started.region}: {started.endpoint_url} (pid {started.pid}); `kafka-asg local env`")
        return 0
    if action == "stop":
        stop_region(paths)
        print("local region stopped and cleaned up")
        return 0
    if action == "status":
        running = region_info(paths)
        if running is None:
            print("no local region runs")
            return 1
        from kafka_asg.local.daemon import memory_rss_kib

        print(f"region {running.region}: {running.endpoint_url} (instances: {running.instance_endpoint_url})")
        print(f"daemon pid {running.pid}, RSS {memory_rss_kib(running.pid) // 1024} MiB; bastion {running.bastion}")
        return 0
    info = _need(region_info(paths))
    if action == "env":
        for key, value in info.env().items():
            print(f"export {key}={value}")
        return 0
    if action == "exec":
        if not target:
            raise ConfigError(["local exec needs a command: kafka-asg local exec -- sh -c '...'"])
        result = make_hosts(paths).exec_in(info.bastion, target)
        sys.stdout.buffer.write(result.stdout)
        sys.stderr.buffer.write(result.stderr)
        return int(result.returncode)
    if not target:
        raise ConfigError([f"local {action} needs a target (SLOT, INSTANCE or AZ)"])
    if action == "kill":
        instance_id = resolve_instance(info, target[0])
        ec2, _ = region_clients(info)
        # A power cut through the API, as an AWS outage would look: the ASG replaces it.
        ec2.terminate_instances(InstanceIds=[instance_id])
        print(f"terminated {instance_id}")
        return 0
    if action in ("az-down", "az-up"):
        print(_admin(info, action, target[0]))
        return 0
    print(_admin(info, action, resolve_instance(info, target[0])))
    return 0


def _serve(args: argparse.Namespace, paths: RegionPaths) -> int:
    from kafka_asg.local.daemon import SPEC_FILE, RegionSpec, serve

    spec_file = paths.root / SPEC_FILE
    if spec_file.exists():
        spec = RegionSpec.from_json(spec_file.read_text())
    else:
        spec = RegionSpec.from_config(_config(args))
        atomic_write(spec_file, spec.to_json())
    return serve(spec, paths, make_hosts(paths))
