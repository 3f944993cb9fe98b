"""fsutil: archive extraction (with and without PEP 706 filters), atomic writes, file hashes."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from kafka_asg.fsutil import atomic_write, safe_extract, sha256_file


def make_tgz(path: Path, members: list[tarfile.TarInfo], data: dict[str, bytes] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info in members:
            body = (data or {}).get(info.name)
            if body is not None:
                info.size = len(body)
            tar.addfile(info, io.BytesIO(body) if body is not None else None)
    return path


def entry(name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o644, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname = kind, mode, link
    return info


@pytest.fixture(params=["filters", "by-hand"])
def extraction(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both code paths: Python >= 3.11.4 (tarfile.data_filter) and the AMI's older 3.11 without it."""
    if request.param == "by-hand":
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    elif not hasattr(tarfile, "data_filter"):
        pytest.skip("this Python has no tar extraction filters")
    return str(request.param)


def test_unpacks_a_distribution_with_modes(tmp_path: Path, extraction: str) -> None:
    archive = make_tgz(
        tmp_path / "a.tgz",
        [
            entry("top", tarfile.DIRTYPE, 0o555),  # read-only: its files must still land in it
            entry("top/bin", tarfile.DIRTYPE, 0o755),
            entry("top/bin/run.sh", mode=0o755),
            entry("top/conf.txt"),
            entry("top/latest", tarfile.SYMTYPE, link="conf.txt"),
        ],
        {"top/bin/run.sh": b"#!/bin/sh\n", "top/conf.txt": b"a=1\n"},
    )
    safe_extract(archive, tmp_path / "out")
    top = tmp_path / "out" / "top"
    assert (top / "conf.txt").read_text() == "a=1\n"
    assert (top / "latest").read_text() == "a=1\n"
    assert (top / "bin" / "run.sh").stat().st_mode & 0o777 == 0o755
    # By hand the archive's 0555 is kept; PEP 706's data filter makes directories owner-writable instead.
    assert top.stat().st_mode & 0o777 == (0o555 if extraction == "by-hand" else 0o755)


@pytest.mark.parametrize(
    ("member", "message"),
    [
        (entry("../escape.txt"), "outside"),
        (entry("top/link", tarfile.SYMTYPE, link="../../etc/passwd"), "outside"),
        (entry("top/abs", tarfile.SYMTYPE, link="/etc/passwd"), "outside|absolute"),
        (entry("top/dev", tarfile.CHRTYPE), "device|special"),
    ],
)
def test_refuses_members_that_leave_the_tree(
    tmp_path: Path, extraction: str, member: tarfile.TarInfo, message: str
) -> None:
    archive = make_tgz(tmp_path / "bad.tgz", [entry("top", tarfile.DIRTYPE, 0o755), member])
    with pytest.raises((ValueError, tarfile.TarError), match=message):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()


def test_absolute_names_never_land_outside(tmp_path: Path, extraction: str) -> None:
    outside = tmp_path / "escape-abs.txt"
    archive = make_tgz(tmp_path / "abs.tgz", [entry(str(outside))], {str(outside): b"x"})
    try:
        safe_extract(archive, tmp_path / "out")
    except ValueError as exc:  # by hand: refused
        assert "outside" in str(exc)
    else:  # the data filter strips the leading "/" and keeps it inside
        assert (tmp_path / "out" / str(outside).lstrip("/")).read_bytes() == b"x"
    assert not outside.exists()


def test_atomic_write_and_sha256(tmp_path: Path) -> None:
    target = tmp_path / "d" / "f.txt"
    atomic_write(target, "one\n")
    atomic_write(target, "two\n")
    assert target.read_text() == "two\n"
    assert [p.name for p in target.parent.iterdir()] == ["f.txt"]  # no temp file left behind
    assert sha256_file(target) == hashlib.sha256(b"two\n").hexdigest()


def test_atomic_write_syncs_unless_told_not_to(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    monkeypatch.setattr("os.fsync", synced.append)
    atomic_write(tmp_path / "durable", "x")
    assert len(synced) == 1
    atomic_write(tmp_path / "report", "y", durable=False)
    assert len(synced) == 1 and (tmp_path / "report").read_text() == "y"
