"""Atomic file writes: temp file in the same directory, fsync, rename (cloud-init ``atomic_helper``)."""

from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
from pathlib import Path


def atomic_write(path: Path, data: str | bytes, mode: int = 0o644, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` so a reader sees the old file or the new one, never a torn one.

    ``durable=False`` skips the fsync: for files rewritten every few seconds that nothing needs after a power
    loss (the agent's status); the rename still keeps readers from seeing a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_properties(text: str) -> dict[str, str]:
    """Parse a Java .properties text (the subset ZooKeeper and Kafka configs use): ``key=value`` lines,
    ``#``/``!`` comments, blank lines; the first ``=`` or ``:`` separates key and value."""
    props: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#!":
            continue
        cut = min((i for i in (line.find("="), line.find(":")) if i >= 0), default=-1)
        if cut < 0:
            props[line] = ""
            continue
        props[line[:cut].strip()] = line[cut + 1 :].strip()
    return props


def safe_extract(archive: Path, dest: Path) -> None:
    """Unpack a tar archive into ``dest``, refusing absolute paths, ``..``, links out of the tree and device files.

    One pass over the (compressed) stream: listing the members first and extracting them after would
    decompress the archive twice (gzip cannot seek back), which is most of the agent's install time.
    Python 3.11.4 added extraction filters (PEP 706); the AMI's python may be older (Debian 12 ships 3.11.2), so
    the same checks are made by hand there, member by member.
    """
    with tarfile.open(archive, "r|*") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
            return
        root = dest.resolve()
        directories: list[tuple[Path, int]] = []
        for member in tar:
            target = (root / member.name).resolve()
            if member.name.startswith("/") or not target.is_relative_to(root):
                raise ValueError(f"{archive}: member {member.name!r} would land outside {dest}")
            if member.isdev():
                raise ValueError(f"{archive}: member {member.name!r} is a device file")
            if member.issym() or member.islnk():
                link = (target.parent / member.linkname).resolve()
                if member.linkname.startswith("/") or not link.is_relative_to(root):
                    raise ValueError(f"{archive}: link {member.name!r} points outside {dest}")
            # Directory modes last (as extractall does): a read-only directory must still receive its files.
            tar.extract(member, dest, set_attrs=not member.isdir())
            if member.isdir():
                directories.append((target, member.mode))
        for path, mode in reversed(directories):
            path.chmod(mode & 0o7777)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (archives are tens of MB)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
