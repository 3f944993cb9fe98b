"""The ext4 superblock fast path of LinuxHost.disk: it may only ever say "a filesystem is there"."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from kafka_asg.agent.linux import EXT_MAGIC, INCOMPAT_EXTENTS, SUPERBLOCK_OFFSET, ext4_superblock


def image(tmp_path: Path, *, magic: int = EXT_MAGIC, incompat: int = INCOMPAT_EXTENTS, label: bytes = b"") -> Path:
    block = bytearray(0x400)
    block[0x38:0x3A] = magic.to_bytes(2, "little")
    block[0x60:0x64] = incompat.to_bytes(4, "little")
    block[0x78 : 0x78 + len(label)] = label
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(SUPERBLOCK_OFFSET) + bytes(block))
    return path


def test_an_ext4_superblock_names_the_filesystem_and_its_label(tmp_path: Path) -> None:
    assert ext4_superblock(image(tmp_path, label=b"zk-data-2")) == {"TYPE": "ext4", "LABEL": "zk-data-2"}
    assert ext4_superblock(image(tmp_path)) == {"TYPE": "ext4"}


def test_anything_else_is_left_to_blkid(tmp_path: Path) -> None:
    assert ext4_superblock(image(tmp_path, magic=0)) == {}  # no ext superblock (an empty volume, or xfs, ...)
    assert ext4_superblock(image(tmp_path, incompat=0)) == {}  # ext2/ext3: blkid tells which
    short = tmp_path / "short.img"
    short.write_bytes(bytes(1100))
    assert ext4_superblock(short) == {}
    assert ext4_superblock(tmp_path / "missing.img") == {}


@pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="needs e2fsprogs")
def test_it_agrees_with_mkfs_ext4(tmp_path: Path) -> None:
    disk = tmp_path / "real.img"
    with open(disk, "wb") as fh:
        fh.truncate(16 * 1024 * 1024)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "kafka-log-3", str(disk)], check=True)
    assert ext4_superblock(disk) == {"TYPE": "ext4", "LABEL": "kafka-log-3"}
