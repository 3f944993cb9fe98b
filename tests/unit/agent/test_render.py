"""render.py: the seed's base configs + this node's parts, as tables of expected lines."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from pathlib import Path, PurePosixPath

import pytest

import kafka_asg
from kafka_asg.agent.render import (
    data_dirs,
    myid_text,
    render_server_properties,
    render_zoo_cfg,
)
from kafka_asg.config import AsgSize, ClusterConfig, Ports, ServerSpec, Slot, Subnet, VolumeSpec
from kafka_asg.errors import ConfigError
from kafka_asg.fsutil import read_properties

# The base configs of the blog post (/work/shared/seed/000_5294e0fd822f733a.txt), verbatim but for the
# post's trailing "..", which is prose, not config.
SEED_ZOOKEEPER = """\
tickTime=2000
dataDir=/var/lib/zookeeper/data
dataLogDir=/var/lib/zookeeper/transaction-log
clientPort=2181
initLimit=15
syncLimit=2
autopurge.purgeInterval=1
server.1=10.0.0.53:2888:3888
server.2=10.0.0.21:2888:3888
server.3=10.0.0.37:2888:3888
"""

SEED_KAFKA = """\
log.dir=/var/lib/kafka/event-log
num.partitions=3
zookeeper.connect=10.0.0.21:2181,10.0.0.37:2181,10.0.0.53:2181
# other settings:
num.recovery.threads.per.data.dir=1
log.flush.interval.ms=2000
"""

SUBNETS = {
    "eu-west-1a": Subnet("eu-west-1a", IPv4Network("10.0.0.48/28")),
    "eu-west-1b": Subnet("eu-west-1b", IPv4Network("10.0.0.16/28")),
    "eu-west-1c": Subnet("eu-west-1c", IPv4Network("10.0.0.32/28")),
}
SLOTS = (
    Slot(1, "eu-west-1a", IPv4Address("10.0.0.53"), SUBNETS["eu-west-1a"]),
    Slot(2, "eu-west-1b", IPv4Address("10.0.0.21"), SUBNETS["eu-west-1b"]),
    Slot(3, "eu-west-1c", IPv4Address("10.0.0.37"), SUBNETS["eu-west-1c"]),
)


def seed_cluster(ports: Ports | None = None) -> ClusterConfig:
    return ClusterConfig(
        name="event-servers",
        region="eu-west-1",
        mode="zookeeper",
        vpc_cidr=IPv4Network("10.0.0.0/26"),
        vpc_id=None,
        subnets=tuple(SUBNETS.values()),
        slots=SLOTS,
        ports=ports or Ports(),
        bucket="com.example.event-servers",
        zookeeper_config=Path("zookeeper.config"),
        kafka_config=Path("kafka.config"),
        zookeeper=ServerSpec("3.8.7", "archives/apache-zookeeper-3.8.7-bin.tar.gz"),
        kafka=ServerSpec("3.9.2", "archives/kafka_2.13-3.9.2.tgz"),
        volumes="per-slot",
        volume=VolumeSpec(),
        instance_type="t3.large",
        ami="ami-0123456789abcdef0",
        asg=AsgSize(2, 3, 4),
        bastion_security_group=None,
    )


CFG = seed_cluster()
SLOT2 = CFG.slot(2)


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def setting_lines(text: str, key: str) -> list[str]:
    """Active (uncommented) lines that set ``key``."""
    return [line for line in lines(text) if not line.startswith("#") and line.split("=", 1)[0].strip() == key]


# ------------------------------------------------------------------------------------------- zoo.cfg


def test_seed_zoo_cfg_keeps_every_user_line_and_adds_whitelist_and_admin_off() -> None:
    out = render_zoo_cfg(SEED_ZOOKEEPER, CFG, SLOT2)
    assert out.startswith(SEED_ZOOKEEPER)
    added = lines(out[len(SEED_ZOOKEEPER) :])
    assert [line for line in added if not line.startswith("#")] == [
        "4lw.commands.whitelist=srvr,ruok,mntr",
        "admin.enableServer=false",
    ]
    props = read_properties(out)
    assert props["clientPort"] == "2181"
    assert [props[f"server.{n}"] for n in (1, 2, 3)] == [
        "10.0.0.53:2888:3888",
        "10.0.0.21:2888:3888",
        "10.0.0.37:2888:3888",
    ]


ZOO_TABLE = [
    # (case, base config, expected active lines in the output, lines that must not be active)
    (
        "no server lines: from the slots, clientPort from ports",
        "tickTime=2000\ndataDir=/var/lib/zookeeper/data\n",
        [
            "clientPort=2182",
            "server.1=10.0.0.53:2890:3890",
            "server.2=10.0.0.21:2890:3890",
            "server.3=10.0.0.37:2890:3890",
        ],
        [],
    ),
    (
        "user whitelist merged, order kept, no duplicates",
        SEED_ZOOKEEPER + "4lw.commands.whitelist=stat, ruok\n",
        ["4lw.commands.whitelist=stat,ruok,srvr,mntr"],
        ["4lw.commands.whitelist=stat, ruok"],
    ),
    (
        "user whitelist * stays *",
        SEED_ZOOKEEPER + "4lw.commands.whitelist=*\n",
        ["4lw.commands.whitelist=*"],
        [],
    ),
    (
        "user turned the admin server on: forced to localhost",
        SEED_ZOOKEEPER + "admin.enableServer=true\nadmin.serverAddress=0.0.0.0\nadmin.serverPort=8081\n",
        ["admin.enableServer=true", "admin.serverPort=8081", "admin.serverAddress=127.0.0.1"],
        ["admin.serverAddress=0.0.0.0", "admin.enableServer=false"],
    ),
    (
        "user configured only the admin port: server on by default, forced to localhost",
        SEED_ZOOKEEPER + "admin.serverPort=8081\n",
        ["admin.serverPort=8081", "admin.serverAddress=127.0.0.1"],
        ["admin.enableServer=false"],
    ),
    (
        "user turned the admin server off: left as is",
        SEED_ZOOKEEPER + "admin.enableServer=false\n",
        ["admin.enableServer=false"],
        ["admin.serverAddress=127.0.0.1"],
    ),
    (
        "user clientPort wins",
        SEED_ZOOKEEPER.replace("clientPort=2181", "clientPort=2999"),
        ["clientPort=2999"],
        ["clientPort=2182"],
    ),
]


@pytest.mark.parametrize(("base", "expected", "absent"), [row[1:] for row in ZOO_TABLE], ids=[r[0] for r in ZOO_TABLE])
def test_zoo_cfg_table(base: str, expected: list[str], absent: list[str]) -> None:
    cfg = seed_cluster(Ports(zk_client=2182, zk_quorum=2890, zk_election=3890))
    out = render_zoo_cfg(base, cfg, cfg.slot(1))
    active = [line for line in lines(out) if not line.startswith("#")]
    for line in expected:
        assert active.count(line) == 1, f"{line!r} not exactly once in:\n{out}"
    for line in absent:
        assert line not in active, f"{line!r} active in:\n{out}"
    # Every key is set once: the rendered file has no conflicting duplicates.
    keys = [line.split("=", 1)[0] for line in active]
    assert len(keys) == len(set(keys)), out


def test_zoo_cfg_server_lines_not_duplicated_when_base_has_them() -> None:
    out = render_zoo_cfg(SEED_ZOOKEEPER, seed_cluster(Ports(zk_quorum=2890)), SLOT2)
    assert setting_lines(out, "server.2") == ["server.2=10.0.0.21:2888:3888"]


def test_zoo_cfg_is_the_same_on_every_node() -> None:
    rendered = {render_zoo_cfg(SEED_ZOOKEEPER, CFG, slot).split("# this node")[0] for slot in CFG.slots}
    assert len(rendered) == 1


def test_myid_is_the_slot_number() -> None:
    assert [myid_text(slot) for slot in CFG.slots] == ["1\n", "2\n", "3\n"]


# ---------------------------------------------------------------------------------- server.properties


def test_seed_server_properties() -> None:
    out = render_server_properties(SEED_KAFKA, CFG, SLOT2, "euw1-az3")
    assert out.startswith(SEED_KAFKA), "user lines and comments are kept in place"
    added = [line for line in lines(out[len(SEED_KAFKA) :]) if not line.startswith("#")]
    assert added == [
        "broker.id=2",
        "listeners=PLAINTEXT://10.0.0.21:9095",
        "advertised.listeners=PLAINTEXT://10.0.0.21:9095",
        "broker.rack=euw1-az3",
        "default.replication.factor=3",
        "min.insync.replicas=2",
        "unclean.leader.election.enable=false",
    ]
    assert setting_lines(out, "zookeeper.connect") == ["zookeeper.connect=10.0.0.21:2181,10.0.0.37:2181,10.0.0.53:2181"]


KAFKA_TABLE = [
    (
        "no zookeeper.connect: from the slots in slot order",
        "log.dir=/data\n",
        ["zookeeper.connect=10.0.0.53:2181,10.0.0.21:2181,10.0.0.37:2181"],
        [],
    ),
    (
        "agent-owned keys override the user's",
        SEED_KAFKA + "broker.id=7\nnode.id=7\nlisteners=PLAINTEXT://0.0.0.0:9092\nbroker.rack = euw1-az1\n",
        ["broker.id=3", "listeners=PLAINTEXT://10.0.0.37:9095", "broker.rack=euw1-az2"],
        ["broker.id=7", "node.id=7", "listeners=PLAINTEXT://0.0.0.0:9092", "broker.rack = euw1-az1"],
    ),
    (
        "user durability keys win",
        SEED_KAFKA + "min.insync.replicas=1\ndefault.replication.factor=2\nunclean.leader.election.enable=true\n",
        ["min.insync.replicas=1", "default.replication.factor=2", "unclean.leader.election.enable=true"],
        ["min.insync.replicas=2", "default.replication.factor=3", "unclean.leader.election.enable=false"],
    ),
    (
        "colon separator is recognised as a key",
        SEED_KAFKA + "advertised.listeners: PLAINTEXT://1.2.3.4:1\n",
        ["advertised.listeners=PLAINTEXT://10.0.0.37:9095"],
        ["advertised.listeners: PLAINTEXT://1.2.3.4:1"],
    ),
]


@pytest.mark.parametrize(
    ("base", "expected", "absent"), [row[1:] for row in KAFKA_TABLE], ids=[r[0] for r in KAFKA_TABLE]
)
def test_server_properties_table(base: str, expected: list[str], absent: list[str]) -> None:
    out = render_server_properties(base, CFG, CFG.slot(3), "euw1-az2")
    active = [line for line in lines(out) if not line.startswith("#")]
    for line in expected:
        assert active.count(line) == 1, f"{line!r} not exactly once in:\n{out}"
    for line in absent:
        assert line not in active, f"{line!r} active in:\n{out}"
    keys = [line.replace(":", "=", 1).split("=", 1)[0].strip() for line in active]
    assert len(keys) == len(set(keys)), out


def test_overridden_user_line_is_kept_as_a_comment() -> None:
    out = render_server_properties(SEED_KAFKA + "broker.id=7\n", CFG, SLOT2, "euw1-az3")
    assert "# kafka-asg owns this key: broker.id=7" in out
    assert read_properties(out)["broker.id"] == "2"


# ------------------------------------------------------------------------------------------ data dirs


def test_seed_data_dirs() -> None:
    zoo = read_properties(render_zoo_cfg(SEED_ZOOKEEPER, CFG, SLOT2))
    kafka = read_properties(render_server_properties(SEED_KAFKA, CFG, SLOT2, "euw1-az3"))
    assert data_dirs(zoo, kafka) == {
        "zk-data": PurePosixPath("/var/lib/zookeeper/data"),
        "zk-txlog": PurePosixPath("/var/lib/zookeeper/transaction-log"),
        "kafka-log": PurePosixPath("/var/lib/kafka/event-log"),
    }


@pytest.mark.parametrize(
    ("zoo", "kafka", "expected"),
    [
        ({"dataDir": "/zk"}, {"log.dir": "/k"}, ("/zk", "/zk", "/k")),
        ({"dataDir": "/zk", "dataLogDir": "/tx"}, {"log.dirs": " /k1 , /k2", "log.dir": "/k"}, ("/zk", "/tx", "/k1")),
    ],
)
def test_data_dirs_table(zoo: dict[str, str], kafka: dict[str, str], expected: tuple[str, str, str]) -> None:
    dirs = data_dirs(zoo, kafka)
    assert (str(dirs["zk-data"]), str(dirs["zk-txlog"]), str(dirs["kafka-log"])) == expected


def test_data_dirs_names_every_problem() -> None:
    with pytest.raises(ConfigError) as err:
        data_dirs({"dataLogDir": "relative/tx"}, {})
    problems = err.value.problems
    assert any("dataDir" in p for p in problems)
    assert any("log.dir" in p and "/tmp/kafka-logs" in p for p in problems)
    assert any("relative/tx" in p for p in problems)


def test_packaged_seed_renders_like_the_blog_post() -> None:
    seed = Path(kafka_asg.__file__).parent / "seed"
    zoo = render_zoo_cfg((seed / "zookeeper.config").read_text(), CFG, SLOT2)
    kafka = render_server_properties((seed / "kafka.config").read_text(), CFG, SLOT2, "euw1-az3")
    assert read_properties(zoo) == read_properties(render_zoo_cfg(SEED_ZOOKEEPER, CFG, SLOT2))
    assert read_properties(kafka) == read_properties(render_server_properties(SEED_KAFKA, CFG, SLOT2, "euw1-az3"))
