"""Render this node's ZooKeeper and Kafka configs from the user's base configs (issue 4, boot step 6).

Pure functions of text and the frozen :class:`~kafka_asg.config.ClusterConfig`: the user's lines and comments
are kept as written; the node's parts are appended in one marked block. Keys the user set win, except the
ones the agent owns (identity and addresses): those lines of the user's are commented out, not deleted, so a
reader of the rendered file sees what was overridden and why.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import PurePosixPath

from kafka_asg.config import ClusterConfig, Slot, VolumeRole
from kafka_asg.errors import ConfigError
from kafka_asg.fsutil import read_properties

# 4lw commands the agent and `kafka-asg verify` need; since ZooKeeper 3.5.3 the default whitelist is only
# `srvr` (zookeeperAdmin "4lw.commands.whitelist").
REQUIRED_4LW = ("srvr", "ruok", "mntr")

# Kafka keys that carry this node's identity or address: the agent's value always wins.
KAFKA_AGENT_OWNED = ("broker.id", "listeners", "advertised.listeners", "broker.rack")

# Safe durability settings for a 3-node cluster, only where the base config is silent (Kafka's own defaults
# are replication factor 1 and min.insync.replicas 1: acks=all would then not mean "on two disks").
KAFKA_DEFAULTS: tuple[tuple[str, str], ...] = (
    ("default.replication.factor", "3"),
    ("min.insync.replicas", "2"),
    ("unclean.leader.election.enable", "false"),
)

# Kafka's built-in log.dirs default; a slot volume mounted there would live under /tmp.
KAFKA_DEFAULT_LOG_DIR = "/tmp/kafka-logs"


def _line_key(line: str) -> str | None:
    """The property key of one config line (the rule of :func:`kafka_asg.fsutil.read_properties`)."""
    stripped = line.strip()
    if not stripped or stripped[0] in "#!":
        return None
    cut = min((i for i in (stripped.find("="), stripped.find(":")) if i >= 0), default=-1)
    return (stripped if cut < 0 else stripped[:cut]).strip()


def _join(lines: Iterable[str], block: list[str], header: str) -> str:
    body = list(lines)
    while body and not body[-1].strip():
        body.pop()
    if block:
        body += ["", f"# --- {header} ---", *block]
    return "\n".join(body) + "\n"


def _without_keys(base_text: str, keys: Iterable[str], why: str) -> list[str]:
    """The base config's lines, with the lines setting ``keys`` commented out (naming ``why``)."""
    owned = set(keys)
    out = []
    for line in base_text.splitlines():
        key = _line_key(line)
        out.append(f"# {why}: {line.strip()}" if key in owned else line)
    return out


# ------------------------------------------------------------------------------------------- ZooKeeper


def server_lines(cfg: ClusterConfig) -> list[str]:
    """``server.N=<fixed ip>:<quorum>:<election>`` for every slot (the seed's ensemble lines)."""
    ports = cfg.ports
    return [
        f"server.{slot.number}={slot.ip}:{ports.zk_quorum}:{ports.zk_election}"
        for slot in sorted(cfg.slots, key=lambda s: s.number)
    ]


def _merged_whitelist(user_value: str | None) -> str:
    if user_value is not None and user_value.strip() == "*":
        return "*"
    words: list[str] = []
    for raw in [*(user_value or "").split(","), *REQUIRED_4LW]:
        word = raw.strip()
        if word and word not in words:
            words.append(word)
    return ",".join(words)


def render_zoo_cfg(base_text: str, cfg: ClusterConfig, slot: Slot) -> str:
    """zoo.cfg = the user's base config + this node's parts.

    - ``server.N`` lines from ``cfg.slots`` when the base config has none (the seed's has them);
    - ``4lw.commands.whitelist`` with at least srvr, ruok, mntr, merged with the user's list;
    - the AdminServer off (``admin.enableServer=false``), or, if the user configured it, bound to 127.0.0.1:
      by default it is Jetty on 0.0.0.0:8080 (zookeeperAdmin "AdminServer");
    - ``clientPort`` from ``cfg.ports`` when absent.

    ``slot`` is the node this file is for; every node renders the same file except for the ``myid`` file
    (:func:`myid_text`), as the ZooKeeper admin guide recommends.
    """
    props = read_properties(base_text)
    whitelist_key = "4lw.commands.whitelist"
    lines = _without_keys(base_text, [whitelist_key], "kafka-asg merged this into 4lw.commands.whitelist below")
    block: list[str] = [f"# this node: slot {slot.number} ({slot.ip}, {slot.az}); its id is in dataDir/myid"]
    if "clientPort" not in props:
        block.append(f"clientPort={cfg.ports.zk_client}")
    if not any(key.startswith("server.") for key in props):
        block += server_lines(cfg)
    block.append(f"{whitelist_key}={_merged_whitelist(props.get(whitelist_key))}")
    admin_keys = [key for key in props if key.startswith("admin.")]
    admin_on = props.get("admin.enableServer", "true").strip().lower() != "false"
    if not admin_keys:
        block.append("admin.enableServer=false")
    elif admin_on:
        # The user wants the AdminServer: keep it, but never on every interface of a dual-homed node.
        why = "kafka-asg binds the AdminServer to localhost"
        lines = _without_keys("\n".join(lines), ["admin.serverAddress"], why)
        block.append("admin.serverAddress=127.0.0.1")
    return _join(lines, block, "kafka-asg: this node's settings")


def myid_text(slot: Slot) -> str:
    """The content of ``<dataDir>/myid``: the slot number (ZooKeeper ``server.N`` == ``myid``)."""
    return f"{slot.number}\n"


# ----------------------------------------------------------------------------------------------- Kafka


def zookeeper_connect(cfg: ClusterConfig) -> str:
    """``ip:clientPort`` of every slot, by slot number."""
    return ",".join(f"{slot.ip}:{cfg.ports.zk_client}" for slot in sorted(cfg.slots, key=lambda s: s.number))


def agent_kafka_properties(cfg: ClusterConfig, slot: Slot, az_id: str) -> dict[str, str]:
    """The Kafka keys the agent owns for ``slot`` (they override the user's)."""
    listener = f"PLAINTEXT://{slot.ip}:{cfg.ports.kafka}"
    return {
        "broker.id": str(slot.number),
        "listeners": listener,
        # Clients and peers must be told the slot's fixed IP, never the instance's primary IP.
        "advertised.listeners": listener,
        # The AZ ID, not the AZ name: names are shuffled per account, IDs are the same physical zone.
        "broker.rack": az_id,
    }


def render_server_properties(base_text: str, cfg: ClusterConfig, slot: Slot, az_id: str) -> str:
    """server.properties = the user's base config + the keys the agent owns + safe defaults.

    Agent-owned (override the user's): ``broker.id``, ``listeners``, ``advertised.listeners``, ``broker.rack``.
    ``zookeeper.connect`` from the slots where the base has none. Where the base is silent:
    ``default.replication.factor=3``, ``min.insync.replicas=2``, ``unclean.leader.election.enable=false``.
    """
    props = read_properties(base_text)
    owned = agent_kafka_properties(cfg, slot, az_id)
    # node.id is broker.id's KRaft name; Kafka refuses a node.id that differs from broker.id.
    lines = _without_keys(base_text, [*owned, "node.id"], "kafka-asg owns this key")
    block = [f"{key}={value}" for key, value in owned.items()]
    if "zookeeper.connect" not in props:
        block.append(f"zookeeper.connect={zookeeper_connect(cfg)}")
    block += [f"{key}={value}" for key, value in KAFKA_DEFAULTS if key not in props]
    return _join(lines, block, f"kafka-asg: this node's settings (slot {slot.number})")


# ------------------------------------------------------------------------------------------- data dirs


def data_dirs(zoo_cfg_props: Mapping[str, str], server_props: Mapping[str, str]) -> dict[VolumeRole, PurePosixPath]:
    """Where each slot volume is mounted: the directories the (rendered) configs put the data in.

    zk-data -> ``dataDir``; zk-txlog -> ``dataLogDir`` (ZooKeeper writes the log to ``dataDir`` when absent);
    kafka-log -> ``log.dirs`` (its first entry) else ``log.dir``, the precedence Kafka applies.

    :raises ConfigError: ``dataDir`` missing or relative; no Kafka log directory (Kafka would use /tmp).
    """
    problems: list[str] = []
    zk_data = zoo_cfg_props.get("dataDir", "").strip()
    if not zk_data:
        problems.append("the ZooKeeper base config has no dataDir: set dataDir=/var/lib/zookeeper/data")
    zk_txlog = zoo_cfg_props.get("dataLogDir", "").strip() or zk_data
    log_dirs = [d.strip() for d in server_props.get("log.dirs", "").split(",") if d.strip()]
    kafka_log = log_dirs[0] if log_dirs else server_props.get("log.dir", "").strip()
    if not kafka_log:
        problems.append(
            f"the Kafka base config has no log.dir or log.dirs (Kafka would use {KAFKA_DEFAULT_LOG_DIR}): "
            "set log.dir=/var/lib/kafka/event-log"
        )
    dirs: dict[VolumeRole, str] = {"zk-data": zk_data, "zk-txlog": zk_txlog, "kafka-log": kafka_log}
    problems += [
        f"{role} directory {path!r} must be an absolute path"
        for role, path in dirs.items()
        if path and not path.startswith("/")
    ]
    if problems:
        raise ConfigError(problems)
    return {role: PurePosixPath(path) for role, path in dirs.items()}
