"""status.json and the agent's ``health`` / ``status`` commands."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from kafka_asg.agent.main import main
from kafka_asg.agent.status import Status, health, read_status, write_status
from kafka_asg.paths import AgentPaths


def status(state: str = "serving", updated_at: float | None = None) -> Status:
    now = time.time() if updated_at is None else updated_at
    return Status(
        state=state,
        reason="no action: zookeeper follower, broker 2 registered" if state == "serving" else "standing by: x",
        instance_id="i-1",
        slot=2 if state == "serving" else None,
        zk_mode="follower",
        broker_registered=state == "serving",
        started_at=now - 100,
        state_since=now - 50,
        updated_at=now,
        cycle=7,
    )


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    write_status(path, status())
    assert read_status(path) == status(updated_at=json.loads(path.read_text())["updated_at"])
    assert json.loads(path.read_text())["version"] == 1


def test_missing_or_garbage_is_none(tmp_path: Path) -> None:
    assert read_status(tmp_path / "nope.json") is None
    (tmp_path / "bad.json").write_text("{")
    assert read_status(tmp_path / "bad.json") is None
    (tmp_path / "empty.json").write_text("")  # what a power loss can leave of a file written without fsync
    assert read_status(tmp_path / "empty.json") is None


def test_the_status_is_written_without_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    monkeypatch.setattr("os.fsync", synced.append)
    write_status(tmp_path / "status.json", status())
    assert synced == []
    assert read_status(tmp_path / "status.json") is not None


def test_health_rules() -> None:
    now = 1_000_000.0
    assert health(status(updated_at=now), now).healthy
    assert not health(status("standby", updated_at=now), now).healthy
    assert not health(status("booting", updated_at=now), now).healthy
    stale = health(status(updated_at=now - 500), now)
    assert not stale.healthy
    assert stale.line.startswith("stale: last status 500s ago")
    assert not health(None, now).healthy


@pytest.mark.parametrize(("state", "code"), [("serving", 0), ("standby", 1), ("refused", 1)])
def test_health_command(tmp_path: Path, capsys: pytest.CaptureFixture[str], state: str, code: int) -> None:
    write_status(AgentPaths(root=tmp_path).status_file, status(state))
    assert main(["health", "--root", str(tmp_path)]) == code
    assert capsys.readouterr().out.startswith(f"{state}: ")


def test_health_without_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["health", "--root", str(tmp_path)]) == 1
    assert "has not written a status" in capsys.readouterr().out


def test_status_json_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_status(AgentPaths(root=tmp_path).status_file, status())
    assert main(["status", "--json", "--root", str(tmp_path)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["state"], doc["slot"], doc["instance_id"]) == ("serving", 2, "i-1")
