"""Shared fixtures for the rehearsal's integration tests: root, the machine left as it was found."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest


def read_machine_state() -> dict[str, set[str]]:
    """What a rehearsal may create and must remove: namespaces, links, loop devices, mounts, routes."""

    def lines(*argv: str) -> set[str]:
        out = subprocess.run(argv, capture_output=True, text=True, check=False).stdout
        return {line.split(" (id:")[0].strip() for line in out.splitlines() if line.strip()}

    mounts = {line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()}
    return {
        "netns": lines("ip", "netns", "list"),
        "links": {line.split(":")[1].strip().split("@")[0] for line in lines("ip", "-o", "link", "show")},
        "loops": lines("losetup", "-a", "-n", "-O", "NAME"),
        "mounts": mounts,
        "routes": lines("ip", "route", "show", "table", "all"),
    }


@pytest.fixture(scope="session")
def machine_state() -> Callable[[], dict[str, set[str]]]:
    """The reader of :func:`read_machine_state`, for module-scoped fixtures that compare before and after."""
    return read_machine_state


@pytest.fixture(scope="session", autouse=True)
def _needs_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("the rehearsal's integration tests need root (namespaces, loop devices, mounts)")
