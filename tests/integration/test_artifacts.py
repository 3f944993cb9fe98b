"""The built artifacts work: ZooKeeper and Kafka from the archives serve on loopback, the agent zipapp runs
on the system python. Builds into the default cache (KAFKA_ASG_CACHE_DIR), reusing what is there.

Loopback only: every server binds 127.0.0.1 and every JVM is stopped by pid in ``finally``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tarfile
import time
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from tests.integration.dist_tools import free_port, run_tool, tool, topic_round_trip

from kafka_asg.artifacts import AGENT_KEY, ArtifactSet, ensure_artifacts
from kafka_asg.config import seed_config
from kafka_asg.fsutil import sha256_file
from kafka_asg.paths import CachePaths
from kafka_asg.retry import wait_until
from kafka_asg.userdata import AGENT_PYTHON_FLAGS

SYSTEM_PYTHON = Path("/usr/bin/python3.11")
SRC = Path(__file__).parents[2] / "src" / "kafka_asg"


@pytest.fixture(scope="module")
def built() -> ArtifactSet:
    return ensure_artifacts(seed_config(), CachePaths.default(), build=True)


@pytest.fixture(scope="module")
def unpacked(built: ArtifactSet, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    dest = tmp_path_factory.mktemp("servers")
    tops = []
    for archive in (built.zookeeper.path, built.kafka.path):
        with tarfile.open(archive) as tar:
            tops.append(tar.getnames()[0].split("/")[0])
            tar.extractall(dest, filter="tar")
    return dest / tops[0], dest / tops[1]


def four_letter(port: int, word: str) -> str:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(word.encode())
            return b"".join(iter(lambda: s.recv(4096), b"")).decode()
    except OSError:
        return ""


def serving(port: int) -> str:
    """The ``srvr`` answer once ZooKeeper serves ("not currently serving requests" until its database loads)."""
    answer = four_letter(port, "srvr")
    return answer if "Mode:" in answer else ""


class Server:
    """A foreground server we started; stopped by its pid (the scripts exec the JVM)."""

    def __init__(self, argv: list[str], env: Mapping[str, str], log: Path) -> None:
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(argv, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)

    def alive(self) -> None:
        assert self.proc.poll() is None, f"exited {self.proc.returncode}: {self.log.read_text()[-3000:]}"


def test_archives_have_official_layout_and_checksums(built: ArtifactSet) -> None:
    for artifact, must in (
        (built.zookeeper, ("bin/zkServer.sh", "bin/zkCli.sh", "conf/logback.xml", "conf/zoo_sample.cfg")),
        (
            built.kafka,
            (
                "bin/kafka-server-start.sh",
                "bin/kafka-run-class.sh",
                "bin/kafka-topics.sh",
                "bin/kafka-console-producer.sh",
                "bin/kafka-console-consumer.sh",
                "bin/zookeeper-shell.sh",
                "bin/kafka-broker-api-versions.sh",
                "config/log4j.properties",
                "config/server.properties",
            ),
        ),
    ):
        assert sha256_file(artifact.path) == artifact.sha256
        assert artifact.path.with_name(artifact.path.name + ".sha256").read_text().split()[0] == artifact.sha256
        with tarfile.open(artifact.path) as tar:
            names = set(tar.getnames())
        top = artifact.path.name.removesuffix(".tgz").removesuffix(".tar.gz")
        assert {n.split("/")[0] for n in names} == {top}
        for member in must:
            assert f"{top}/{member}" in names, member
    with tarfile.open(built.zookeeper.path) as tar:
        zk_jars = {Path(n).name for n in tar.getnames() if n.endswith(".jar")}
    assert {"zookeeper-3.8.7.jar", "zookeeper-jute-3.8.7.jar"} <= zk_jars
    assert any(j.startswith("logback-classic-") for j in zk_jars)
    with tarfile.open(built.kafka.path) as tar:
        kafka_jars = {Path(n).name for n in tar.getnames() if n.endswith(".jar")}
    assert {"kafka_2.13-3.9.2.jar", "kafka-tools-3.9.2.jar", "slf4j-reload4j-1.7.36.jar"} <= kafka_jars
    assert built.agent.key == AGENT_KEY


def test_second_call_reuses_the_cache(built: ArtifactSet) -> None:
    archives = (built.zookeeper.path, built.kafka.path)
    mtimes = [p.stat().st_mtime_ns for p in archives]
    started = time.monotonic()
    again = ensure_artifacts(seed_config(), CachePaths.default(), build=True)
    # The agent may be rebuilt if someone edited src/kafka_asg meanwhile (it is keyed on the source).
    assert (again.zookeeper, again.kafka) == (built.zookeeper, built.kafka)
    assert [p.stat().st_mtime_ns for p in archives] == mtimes
    assert time.monotonic() - started < 30
    assert ensure_artifacts(seed_config(), CachePaths.default(), build=False).kafka == built.kafka


def _bare_env() -> dict[str, str]:
    # The system python must not see the venv.
    return {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}


@pytest.mark.skipif(not SYSTEM_PYTHON.exists(), reason="no /usr/bin/python3.11 on this machine")
def test_agent_zipapp_runs_on_system_python_with_the_standard_library_and_kazoo(built: ArtifactSet) -> None:
    code = (
        f"import sys; sys.path.insert(0, {str(built.agent.path)!r})\n"
        "import kazoo.client, kafka_asg, kafka_asg.agent.aws, kafka_asg.agent.main\n"
        "for name in ('botocore', 'boto3', 'kafka_asg.cli'):\n"
        "    try:\n        __import__(name)\n"
        "    except ImportError:\n        print('no', name)\n"
        "print(kafka_asg.__file__)\n"
        # Run as the user data runs it: nothing from the system's site-packages, only the zipapp's pinned
        # packages and the standard library.
        "outside = sorted({m.split('.')[0] for m, mod in sys.modules.items() if 'packages' in str(getattr(mod, "
        "'__file__', '')) and '.pyz/' not in str(getattr(mod, '__file__', ''))})\n"
        "print('outside the zipapp:', outside)\n"
    )
    proc = subprocess.run(
        [str(SYSTEM_PYTHON), *AGENT_PYTHON_FLAGS, "-c", code],
        env=_bare_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    # The agent's modules and kazoo only: no AWS SDK, no operator side.
    assert "no botocore" in proc.stdout and "no boto3" in proc.stdout and "no kafka_asg.cli" in proc.stdout
    assert "kafka-asg-agent.pyz/kafka_asg" in proc.stdout  # imported in place from the zipapp, not the checkout
    assert "outside the zipapp: []" in proc.stdout, proc.stdout
    assert built.agent.path.read_bytes().startswith(b"#!/usr/bin/env python3\n")
    # Bytecode beside every module, where zipimport looks for it (nothing is compiled at an agent's start).
    # Stored, not deflated: zipimport would inflate each module at every agent start.
    with zipfile.ZipFile(built.agent.path) as pyz:
        names = set(pyz.namelist())
        deflated_bytecode = [i.filename for i in pyz.infolist() if i.filename.endswith(".pyc") and i.compress_type]
    sources = {n for n in names if n.endswith(".py")}
    assert "__main__.py" in sources and "kafka_asg/agent/aws.py" in sources and "kazoo/client.py" in sources
    assert {n for n in sources if n + "c" not in names} == set()
    assert deflated_bytecode == []


@pytest.mark.skipif(not SYSTEM_PYTHON.exists(), reason="no /usr/bin/python3.11 on this machine")
def test_agent_console_script_help(built: ArtifactSet) -> None:
    if not (SRC / "agent" / "main.py").exists():
        pytest.skip("kafka_asg.agent.main (the agent's entry point) is not written yet")
    proc = subprocess.run(
        [str(SYSTEM_PYTHON), *AGENT_PYTHON_FLAGS, str(built.agent.path), "--help"],
        env=_bare_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "usage" in proc.stdout.lower()


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    try:
        yield started
    finally:
        for server in reversed(started):
            server.stop()


@pytest.mark.jvm
def test_zookeeper_and_kafka_serve_from_the_archives(
    unpacked: tuple[Path, Path], tmp_path: Path, servers: list[Server]
) -> None:
    zk_home, kafka_home = unpacked
    zk_port, kafka_port = free_port(), free_port()
    zoo_cfg = tmp_path / "zoo.cfg"
    zoo_cfg.write_text(
        f"tickTime=2000\ndataDir={tmp_path / 'zk-data'}\nclientPort={zk_port}\nclientPortAddress=127.0.0.1\n"
        "admin.enableServer=false\n4lw.commands.whitelist=srvr,ruok\n"
    )
    zk_logs = tmp_path / "zk-logs"
    servers.append(
        Server(
            [str(zk_home / "bin" / "zkServer.sh"), "start-foreground", str(zoo_cfg)],
            {"ZOO_LOG_DIR": str(zk_logs), "SERVER_JVMFLAGS": "-Xmx256m"},
            tmp_path / "zk.out",
        )
    )
    srvr = wait_until("zookeeper srvr", lambda: serving(zk_port), deadline=30, interval=0.3)
    assert "Mode: standalone" in srvr
    assert "Zookeeper version: 3.8.7" in srvr

    props = tmp_path / "server.properties"
    props.write_text(
        f"broker.id=0\nlisteners=PLAINTEXT://127.0.0.1:{kafka_port}\nlog.dirs={tmp_path / 'kafka-data'}\n"
        f"zookeeper.connect=127.0.0.1:{zk_port}\noffsets.topic.replication.factor=1\nnum.partitions=1\n"
        "transaction.state.log.replication.factor=1\ntransaction.state.log.min.isr=1\n"
        "group.initial.rebalance.delay.ms=0\n"
    )
    kafka_logs = tmp_path / "kafka-logs"
    kafka = Server(
        [str(kafka_home / "bin" / "kafka-server-start.sh"), str(props)],
        {"LOG_DIR": str(kafka_logs), "KAFKA_HEAP_OPTS": "-Xmx512m -Xms256m"},
        tmp_path / "kafka.out",
    )
    servers.append(kafka)
    bin_dir = kafka_home / "bin"
    zk_connect = f"127.0.0.1:{zk_port}"

    def registered() -> bool:
        kafka.alive()
        # Exits 1 with "Node does not exist" until the first broker registers.
        return "[0]" in run_tool(bin_dir, "zookeeper-shell.sh", zk_connect, "ls", "/brokers/ids").stdout

    wait_until("broker 0 in /brokers/ids", registered, deadline=60, interval=1)

    bootstrap = f"127.0.0.1:{kafka_port}"
    assert f"127.0.0.1:{kafka_port} (id: 0 rack: null)" in tool(
        bin_dir, "kafka-broker-api-versions.sh", "--bootstrap-server", bootstrap
    )
    zk_cli = run_tool(zk_home / "bin", "zkCli.sh", "-server", zk_connect, "ls", "/brokers/ids")
    assert zk_cli.returncode == 0, zk_cli.stderr
    assert "[0]" in zk_cli.stdout
    topic_round_trip(bin_dir, bootstrap, "hello asg")

    # The log backends work: both servers wrote their own log files, not just stdout.
    assert (zk_logs / "zookeeper-server.log").stat().st_size > 0
    assert (kafka_logs / "server.log").stat().st_size > 0
    assert "started (kafka.server.KafkaServer)" in (kafka_logs / "server.log").read_text()
