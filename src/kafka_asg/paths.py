"""Every path kafka-asg uses, derived from one root object (cloud-init ``helpers.Paths``).

The node agent's paths hang off :class:`AgentPaths` (``root=/`` on a real instance; a temp dir in unit
tests). The local region's files hang off :class:`RegionPaths`; the build cache off :class:`CachePaths`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePath


@dataclass(frozen=True)
class AgentPaths:
    """Where the node agent keeps its state, installs and rendered files on one instance."""

    root: Path = Path("/")

    def under_root(self, absolute: str | PurePath) -> Path:
        """Map an absolute path from a config file (e.g. ``/var/lib/zookeeper/data``) below ``root``."""
        return self.root / str(absolute).lstrip("/")

    @property
    def state_dir(self) -> Path:
        return self.under_root("/var/lib/kafka-asg")

    @property
    def status_file(self) -> Path:
        return self.state_dir / "status.json"

    @property
    def semaphores_dir(self) -> Path:
        """Per-instance / per-boot markers (cloud-init's ``sem`` directory)."""
        return self.state_dir / "sem"

    @property
    def downloads_dir(self) -> Path:
        return self.state_dir / "downloads"

    @property
    def install_dir(self) -> Path:
        return self.under_root("/opt/kafka-asg")

    @property
    def config_dir(self) -> Path:
        return self.under_root("/etc/kafka-asg")

    @property
    def log_dir(self) -> Path:
        return self.under_root("/var/log/kafka-asg")


def _default_region_state() -> Path:
    return Path(os.environ.get("KAFKA_ASG_STATE_DIR", "/var/lib/kafka-asg-rehearsal"))


def _default_cache() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(os.environ.get("KAFKA_ASG_CACHE_DIR", str(Path(xdg) / "kafka-asg")))


@dataclass(frozen=True)
class RegionPaths:
    """Files of the local region (the rehearsal); everything here is removed by ``local stop``."""

    root: Path

    @classmethod
    def default(cls) -> RegionPaths:
        return cls(_default_region_state())

    @property
    def pid_file(self) -> Path:
        return self.root / "region.pid"

    @property
    def endpoint_file(self) -> Path:
        """JSON written by the daemon once it serves: operator endpoint, instance endpoint, region."""
        return self.root / "region.json"

    @property
    def log_file(self) -> Path:
        return self.root / "region.log"

    @property
    def journal_file(self) -> Path:
        """Every OS object the region creates is recorded here *before* it is created (crash cleanup)."""
        return self.root / "journal.jsonl"

    @property
    def volumes_dir(self) -> Path:
        """One sparse file per EBS volume: ``vol-xxxx.img``."""
        return self.root / "volumes"

    @property
    def instances_dir(self) -> Path:
        """Per instance: overlay upper/work dirs, merged root, /dev tmpfs."""
        return self.root / "instances"

    @property
    def netns_dir(self) -> Path:
        """Bind-mount targets for persistent mount namespaces."""
        return self.root / "ns"

    def instance_dir(self, instance_id: str) -> Path:
        return self.instances_dir / instance_id


@dataclass(frozen=True)
class CachePaths:
    """Build outputs that outlive a region: server archives from Maven Central, the agent zipapp."""

    root: Path

    @classmethod
    def default(cls) -> CachePaths:
        return cls(_default_cache())

    @property
    def artifacts_dir(self) -> Path:
        return self.root / "artifacts"

    @property
    def maven_work_dir(self) -> Path:
        return self.root / "maven"
