"""The Kafka 4.x archive works in KRaft mode: one combined broker+controller node, formatted with
``kafka-storage.sh --standalone``, elects itself leader and serves topics on loopback. Builds into the default
cache (KAFKA_ASG_CACHE_DIR), reusing what is there.

Loopback only: every listener binds 127.0.0.1 and the JVM is stopped by pid in ``finally``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.integration.dist_tools import free_port, run_tool, tool, topic_round_trip

from kafka_asg.artifacts import Artifact, ensure_kraft_kafka, missing_main_classes, script_main_classes
from kafka_asg.fsutil import sha256_file
from kafka_asg.paths import CachePaths
from kafka_asg.retry import wait_until

pytestmark = pytest.mark.jvm

TOP = "kafka_2.13-4.4.0"


@pytest.fixture(scope="module")
def built() -> Artifact:
    return ensure_kraft_kafka(CachePaths.default(), build=True)


@pytest.fixture(scope="module")
def home(built: Artifact, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("kraft")
    with tarfile.open(built.path) as tar:
        tar.extractall(dest, filter="tar")
    return dest / TOP


def test_archive_has_official_layout_and_every_main_class(built: Artifact, home: Path) -> None:
    assert built.key == f"archives/{TOP}.tgz"
    assert sha256_file(built.path) == built.sha256
    with tarfile.open(built.path) as tar:
        names = set(tar.getnames())
    assert {n.split("/")[0] for n in names} == {TOP}
    jars = sorted((home / "libs").glob("*.jar"))
    assert {"kafka_2.13-4.4.0.jar", "kafka-tools-4.4.0.jar", "log4j-core-2.25.5.jar"} <= {j.name for j in jars}
    # No Log4j 1 / reload4j left from 3.x, and exactly one SLF4J binding.
    assert not [j.name for j in jars if j.name.startswith(("reload4j", "slf4j-reload4j", "log4j-1.2"))]
    entries: list[str] = []
    for jar in jars:
        with zipfile.ZipFile(jar) as zf:
            entries.extend(zf.namelist())
    assert entries.count("org/slf4j/impl/StaticLoggerBinder.class") == 1
    classes = script_main_classes(home / "bin")
    assert len(classes) == 6
    assert missing_main_classes(classes, entries) == []


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)


def test_combined_node_formats_elects_itself_and_serves_a_topic(
    home: Path, tmp_path: Path, started: list[subprocess.Popen[bytes]]
) -> None:
    cluster_id = tool(home / "bin", "kafka-storage.sh", "random-uuid").strip()
    # A Kafka cluster id is a 16-byte UUID in URL-safe base64 without padding (22 characters).
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", cluster_id), cluster_id

    broker_port, controller_port = free_port(), free_port()
    props = tmp_path / "server.properties"
    props.write_text(
        "process.roles=broker,controller\nnode.id=1\n"
        f"listeners=PLAINTEXT://127.0.0.1:{broker_port},CONTROLLER://127.0.0.1:{controller_port}\n"
        "controller.listener.names=CONTROLLER\ninter.broker.listener.name=PLAINTEXT\n"
        "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT\n"
        f"controller.quorum.bootstrap.servers=127.0.0.1:{controller_port}\n"
        f"log.dirs={tmp_path / 'data'}\nnum.partitions=1\noffsets.topic.replication.factor=1\n"
        "transaction.state.log.replication.factor=1\ntransaction.state.log.min.isr=1\n"
        "share.coordinator.state.topic.replication.factor=1\nshare.coordinator.state.topic.min.isr=1\n"
        "group.initial.rebalance.delay.ms=0\n"
    )
    # --standalone: this node is the whole initial controller quorum (KIP-853 dynamic quorum).
    tool(home / "bin", "kafka-storage.sh", "format", "-t", cluster_id, "-c", str(props), "--standalone")
    assert f"cluster.id={cluster_id}" in (tmp_path / "data" / "meta.properties").read_text()

    logs = tmp_path / "logs"
    out = tmp_path / "kafka.out"
    env = {**os.environ, "LOG_DIR": str(logs), "KAFKA_HEAP_OPTS": "-Xmx512m -Xms256m"}
    with out.open("wb") as fh:
        node = subprocess.Popen(
            [str(home / "bin" / "kafka-server-start.sh"), str(props)], env=env, stdout=fh, stderr=subprocess.STDOUT
        )
    started.append(node)
    bootstrap = f"127.0.0.1:{broker_port}"

    def leader() -> bool:
        assert node.poll() is None, f"kafka exited {node.returncode}:\n{out.read_text()[-3000:]}"
        proc = run_tool(
            home / "bin", "kafka-metadata-quorum.sh", "--bootstrap-server", bootstrap, "describe", "--status"
        )
        return proc.returncode == 0 and re.search(r"^LeaderId:\s+1$", proc.stdout, re.MULTILINE) is not None

    wait_until("node 1 leads the KRaft quorum", leader, deadline=60, interval=1)

    topic_round_trip(home / "bin", bootstrap, "hello kraft")

    # Log4j2 works: the server wrote its own log file through config/log4j2.properties, not just stdout.
    server_log = logs / "server.log"
    assert server_log.stat().st_size > 0
    assert "Kafka Server started" in server_log.read_text()
