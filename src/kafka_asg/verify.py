"""``kafka-asg verify``: the seed's ``echo srvr | nc IP 2181`` check, done right, plus a Kafka round trip.

``srvr`` answers (and ``nc`` exits 0) even when a server is not in a quorum, so the *answer* is read: every slot
must say ``Mode: leader`` or ``Mode: follower``, with exactly one leader. Then every broker must be in every
broker's metadata at its fixed IP, a topic is created (RF 3, the base config's ``num.partitions``), N messages
are produced with ``acks=all`` and all N consumed back. Probes run through a :class:`ProbeRunner`: in the rehearsal,
the bastion namespace (the root namespace never talks to rehearsal addresses); on AWS, this host, which must
then be inside the VPC.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from kafka_asg.config import ClusterConfig
from kafka_asg.errors import KafkaAsgError
from kafka_asg.fsutil import read_properties, safe_extract
from kafka_asg.paths import CachePaths
from kafka_asg.retry import Retry, RetryExhausted

logger = logging.getLogger(__name__)

_MODE = re.compile(r"^Mode:\s*(\w+)", re.MULTILINE)
NOT_SERVING = "This ZooKeeper instance is not currently serving requests"

T = TypeVar("T")


class VerifyFailed(KafkaAsgError):
    """The cluster is not healthy; the message says which check failed and what it saw."""


@dataclass(frozen=True)
class Probe:
    returncode: int
    stdout: str
    stderr: str


class ProbeRunner(Protocol):
    def __call__(self, argv: Sequence[str], timeout: float) -> Probe: ...


def host_runner(argv: Sequence[str], timeout: float) -> Probe:
    """Run a probe on this host (on AWS: a host inside the VPC, like the seed's bastion)."""
    try:
        done = subprocess.run(list(argv), capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return Probe(124, "", f"timed out after {timeout:.0f}s")
    return Probe(done.returncode, done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace"))


def zk_mode_from_srvr(answer: str) -> str:
    """``leader`` | ``follower`` | ``standalone`` | ``not serving`` | ``no answer``."""
    if NOT_SERVING in answer:
        return "not serving"
    match = _MODE.search(answer)
    return match.group(1) if match else "no answer"


def quorum_problems(modes: Mapping[int, str]) -> list[str]:
    problems = [
        f"slot {slot}: ZooKeeper {mode}" for slot, mode in sorted(modes.items()) if mode not in ("leader", "follower")
    ]
    leaders = [slot for slot, mode in modes.items() if mode == "leader"]
    if not problems and len(leaders) != 1:
        problems.append(f"expected exactly one ZooKeeper leader, found {len(leaders)} (slots {sorted(leaders)})")
    return problems


def broker_view(kcat_json: str) -> tuple[int | None, dict[int, str]]:
    """``kcat -L -J`` → (the id of the broker that answered, {broker id: "host:port"} in its metadata)."""
    data = json.loads(kcat_json)
    origin = data.get("originating_broker") or {}
    answered_by = int(origin["id"]) if "id" in origin else None
    return answered_by, {int(b["id"]): str(b["name"]) for b in data.get("brokers", [])}


def broker_problems(cfg: ClusterConfig, brokers: Mapping[int, str]) -> list[str]:
    problems = []
    for slot in cfg.slots:
        want = f"{slot.ip}:{cfg.ports.kafka}"
        got = brokers.get(slot.number)
        if got != want:
            problems.append(f"broker {slot.number}: expected at {want}, metadata says {got or 'not registered'}")
    return problems


def kafka_tools(cfg: ClusterConfig, cache: CachePaths | None = None) -> Path:
    """The Kafka distribution's ``bin/`` for the admin CLIs, unpacked once from the cached archive."""
    from kafka_asg.artifacts import ensure_artifacts

    cache = cache or CachePaths.default()
    archive = ensure_artifacts(cfg, cache, build=False).kafka.path
    dest = cache.root / "tools" / archive.name.removesuffix(".tgz").removesuffix(".tar.gz")
    if not (dest / ".complete").exists():
        dest.mkdir(parents=True, exist_ok=True)
        safe_extract(archive, dest)
        (dest / ".complete").touch()
    (top,) = [p for p in dest.iterdir() if p.is_dir()]
    return top / "bin"


def check_quorum(cfg: ClusterConfig, run: ProbeRunner) -> dict[int, str]:
    modes: dict[int, str] = {}
    for slot in cfg.slots:
        probe = run(["sh", "-c", f"printf srvr | nc -w 5 {slot.ip} {cfg.ports.zk_client}"], 15)
        modes[slot.number] = zk_mode_from_srvr(probe.stdout)
    if problems := quorum_problems(modes):
        raise VerifyFailed("ZooKeeper quorum: " + "; ".join(problems))
    return modes


def check_brokers(cfg: ClusterConfig, run: ProbeRunner) -> dict[int, str]:
    """Every broker must list every slot's broker at its fixed IP *in its own metadata*.

    Each broker answers metadata requests from its own cache, which the controller updates after a broker joins
    (Kafka docs, "Broker Configs": auto-created topics take ``default.replication.factor``); a broker whose cache
    still lacks a rejoined broker refuses to auto-create an RF 3 topic ("Invalid replication factor"), so one
    broker's view is not enough.
    """
    brokers: dict[int, str] = {}
    for slot in cfg.slots:
        address = f"{slot.ip}:{cfg.ports.kafka}"
        probe = run(["kcat", "-b", address, "-L", "-J", "-m", "10"], 30)
        if probe.returncode != 0:
            raise VerifyFailed(f"kafka metadata from broker {slot.number}: kcat -L failed: {probe.stderr.strip()}")
        answered_by, view = broker_view(probe.stdout)
        if answered_by != slot.number:
            raise VerifyFailed(f"kafka metadata from {address}: answered by broker {answered_by}, not {slot.number}")
        if problems := broker_problems(cfg, view):
            raise VerifyFailed(f"kafka brokers, as broker {slot.number} sees them: " + "; ".join(problems))
        brokers = view
    return brokers


def settled(what: str, check: Callable[[], T], deadline: float) -> T:
    """Re-run a check until it passes or ``deadline`` seconds have passed: right after a replacement the
    ensemble may still be electing or a loaded server slow to answer. The last failure is the verdict."""
    try:
        return Retry(deadline=deadline, delay=1.0, max_delay=3.0, retry_on=(VerifyFailed,))(what, check)
    except RetryExhausted as exc:
        raise VerifyFailed(str(exc.last)) from exc


def verify(
    cfg: ClusterConfig,
    run: ProbeRunner,
    *,
    messages: int = 100,
    tools_bin: Path | None = None,
    settle_seconds: float = 60.0,
    say: Callable[[str], None] = print,
) -> None:
    """Raise :class:`VerifyFailed` naming the first failed check; ``say`` each passed one."""
    modes = settled("zookeeper quorum", lambda: check_quorum(cfg, run), settle_seconds)
    say("zookeeper: " + ", ".join(f"{slot} {mode}" for slot, mode in sorted(modes.items())))

    bootstrap = ",".join(f"{s.ip}:{cfg.ports.kafka}" for s in cfg.slots)
    brokers = settled("kafka brokers", lambda: check_brokers(cfg, run), settle_seconds)
    say("kafka: brokers " + ", ".join(f"{i}@{h}" for i, h in sorted(brokers.items())))

    partitions = int(read_properties(cfg.kafka_config.read_text()).get("num.partitions", "1"))
    topic = f"kafka-asg-verify-{int(time.time())}"
    tools = tools_bin or kafka_tools(cfg)
    create = [
        str(tools / "kafka-topics.sh"), "--bootstrap-server", bootstrap, "--create", "--topic", topic,
        "--partitions", str(partitions), "--replication-factor", str(min(3, len(cfg.slots))),
    ]  # fmt: skip
    probe = run(create, 120)
    if probe.returncode != 0:
        raise VerifyFailed(f"create topic {topic}: {(probe.stderr or probe.stdout).strip()[-500:]}")
    say(f"kafka: created topic {topic} ({partitions} partitions, RF {min(3, len(cfg.slots))})")

    produce_and_consume(bootstrap, topic, messages, run)
    say(f"kafka: produced {messages} messages with acks=all and consumed all {messages} back")


def produce(bootstrap: str, topic: str, payloads: Sequence[str], run: ProbeRunner) -> None:
    lines = shlex.quote("\n".join(payloads) + "\n")
    script = (
        f"printf %s {lines} | kcat -P -b {shlex.quote(bootstrap)} -t {shlex.quote(topic)} "
        "-X acks=all -X message.timeout.ms=60000"
    )
    probe = run(["sh", "-c", script], 120)
    if probe.returncode != 0 or "Delivery failed" in probe.stderr or "ERROR" in probe.stderr:
        raise VerifyFailed(f"produce to {topic}: {probe.stderr.strip()[-500:]}")


def consume_all(bootstrap: str, topic: str, run: ProbeRunner) -> list[str]:
    probe = run(["kcat", "-C", "-b", bootstrap, "-t", topic, "-o", "beginning", "-e", "-q", "-f", "%s\\n"], 120)
    if probe.returncode != 0:
        raise VerifyFailed(f"consume {topic}: {probe.stderr.strip()[-500:]}")
    return [line for line in probe.stdout.splitlines() if line]


def produce_and_consume(bootstrap: str, topic: str, count: int, run: ProbeRunner) -> None:
    payloads = [f"{topic}-message-{i}" for i in range(count)]
    produce(bootstrap, topic, payloads, run)
    got = consume_all(bootstrap, topic, run)
    if sorted(got) != sorted(payloads):
        missing = len(set(payloads) - set(got))
        raise VerifyFailed(f"consume {topic}: got {len(got)} messages back, {missing} of {count} missing")
