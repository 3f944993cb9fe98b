"""``kafka-asg init`` and ``kafka-asg validate``: the offline commands (no boto3 import)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from kafka_asg.config import DEFAULT_CONFIG_PATH, SEED_DIR, validate_file
from kafka_asg.errors import ConfigError
from kafka_asg.fsutil import atomic_write

logger = logging.getLogger(__name__)

SEED_FILES = ("cluster.toml", "zookeeper.config", "kafka.config")


def cmd_init(args: argparse.Namespace) -> int:
    """Write the seed's cluster.toml and its two base config files (next to it)."""
    target = Path(args.path)
    names = {"cluster.toml": target, "zookeeper.config": target.parent / "zookeeper.config"}
    names["kafka.config"] = target.parent / "kafka.config"
    existing = [str(p) for p in names.values() if p.exists()]
    if existing and not args.force:
        raise ConfigError([f"{p}: already exists; pass --force to overwrite it" for p in existing])
    for seed_name, dest in names.items():
        atomic_write(dest, (SEED_DIR / seed_name).read_bytes())
        print(f"wrote {dest}")
    print(f"next: edit {target}, then `kafka-asg validate -c {target}` and `kafka-asg plan -c {target}`")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Check the config offline and print every problem; exit 1 when there is any error."""
    path = Path(args.config) if args.config else DEFAULT_CONFIG_PATH
    errors, warnings = validate_file(path)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if errors:
        print(f"{path}: {len(errors)} problem(s):", file=sys.stderr)
        for error in errors:
            print(f"  - {error}", file=sys.stderr)
        return 1
    print(f"{path}: valid ({len(warnings)} warning(s))")
    return 0
