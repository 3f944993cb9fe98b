"""What provisioning uploads and launches, beyond the config: built outside ``provision``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProvisionInputs:
    """``user_data``: the launch template's user data script (``kafka_asg.userdata``).
    ``objects``: S3 key -> local file for the large bucket objects (server archives, the agent zipapp,
    from ``kafka_asg.artifacts``). Provisioning adds the base configs, ``cluster.json`` and the manifest."""

    user_data: str
    objects: Mapping[str, Path]
