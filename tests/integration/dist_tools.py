"""Helpers for the archive tests: run a server distribution's ``bin/`` scripts, pick free loopback ports, and
round-trip one message through a topic with the console tools (loopback only)."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_tool(bin_dir: Path, name: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KAFKA_HEAP_OPTS": "-Xmx128m"}
    argv = [str(bin_dir / name), *args]
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, env=env, timeout=60, check=False)


def tool(bin_dir: Path, name: str, *args: str, stdin: str | None = None) -> str:
    proc = run_tool(bin_dir, name, *args, stdin=stdin)
    assert proc.returncode == 0, f"{name} {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def topic_round_trip(bin_dir: Path, bootstrap: str, message: str) -> None:
    """Create topic t1, see it listed, produce ``message`` and consume it back with the console tools."""
    tool(bin_dir, "kafka-topics.sh", "--bootstrap-server", bootstrap, "--create", "--topic", "t1", "--partitions", "1")
    assert "t1" in tool(bin_dir, "kafka-topics.sh", "--bootstrap-server", bootstrap, "--list").split()
    tool(bin_dir, "kafka-console-producer.sh", "--bootstrap-server", bootstrap, "--topic", "t1", stdin=message + "\n")
    consumed = tool(
        bin_dir, "kafka-console-consumer.sh", "--bootstrap-server", bootstrap, "--topic", "t1",
        "--from-beginning", "--max-messages", "1", "--timeout-ms", "30000",
    )  # fmt: skip
    assert consumed.strip() == message
