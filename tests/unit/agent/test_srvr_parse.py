"""servers.parse_srvr: the answer of ZooKeeper's ``srvr`` must be read, not just received."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from kafka_asg.agent.ports import ZkMode
from kafka_asg.agent.servers import ZK_NOT_SERVING, ProcessServices, backoff_delay, parse_srvr
from kafka_asg.paths import AgentPaths


def srvr_answer(mode: str) -> str:
    # The shape of ZooKeeper 3.8's answer (ServerStats / StatCommand).
    return (
        "Zookeeper version: 3.8.7-0123abc, built on 2025-01-01 00:00 UTC\n"
        "Latency min/avg/max: 0/0.5/3\n"
        "Received: 12\nSent: 11\nConnections: 1\nOutstanding: 0\n"
        "Zxid: 0x100000004\n"
        f"Mode: {mode}\n"
        "Node count: 5\n"
    )


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (srvr_answer("leader") + "Proposal sizes last/min/max: 48/48/48\n", "leader"),
        (srvr_answer("follower"), "follower"),
        (srvr_answer("standalone"), "standalone"),
        (ZK_NOT_SERVING + "\n", "not serving"),
        (srvr_answer("observer"), "not serving"),
        (srvr_answer("read-only"), "not serving"),
        ("", "not serving"),
        ("HTTP/1.1 400 Bad Request\r\n\r\n", "not serving"),
        ("\x00\x01garbage Mode leader", "not serving"),
        ("srvr is not executed because it is not in the whitelist.\n", "not serving"),
    ],
    ids=["leader", "follower", "standalone", "not-serving", "observer", "read-only", "empty", "http", "garbage", "4lw"],
)
def test_parse_srvr(answer: str, expected: ZkMode) -> None:
    assert parse_srvr(answer) == expected


def test_backoff_doubles_and_caps_at_a_minute() -> None:
    assert [backoff_delay(n) for n in (1, 2, 3, 5, 6, 10)] == [2, 4, 8, 32, 60, 60]


@pytest.fixture
def srvr_server() -> Iterator[tuple[int, list[bytes], list[str]]]:
    """A one-shot TCP server on 127.0.0.1 that answers like ZooKeeper: reads the 4lw, answers, closes."""
    answers: list[str] = []
    received: list[bytes] = []
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(5)

    def serve() -> None:
        for answer in answers:
            conn, _ = listener.accept()
            with conn:
                received.append(conn.recv(4))
                conn.sendall(answer.encode())

    answers.extend([srvr_answer("follower"), ZK_NOT_SERVING + "\n"])
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1], received, answers
    thread.join(timeout=5)
    listener.close()


def test_zk_mode_sends_srvr_and_reads_the_answer(
    srvr_server: tuple[int, list[bytes], list[str]], tmp_path: Path
) -> None:
    port, received, _ = srvr_server
    services = ProcessServices(AgentPaths(root=tmp_path))
    assert services.zk_mode(IPv4Address("127.0.0.1"), port) == "follower"
    assert services.zk_mode(IPv4Address("127.0.0.1"), port) == "not serving"
    assert received == [b"srvr", b"srvr"]


def test_zk_mode_down_when_refused(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    assert ProcessServices(AgentPaths(root=tmp_path)).zk_mode(IPv4Address("127.0.0.1"), free_port) == "down"


def test_zk_mode_not_serving_when_the_port_is_held_but_silent(tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()  # accepts (in the kernel backlog) but never answers
        port = listener.getsockname()[1]
        assert ProcessServices(AgentPaths(root=tmp_path)).zk_mode(IPv4Address("127.0.0.1"), port) == "not serving"
