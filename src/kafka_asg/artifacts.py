"""Server archives from Maven Central, and the node agent as one zipapp (``kafka-asg artifacts build|list``).

No Kafka broker package exists outside Apache's download site, but Maven Central serves every jar of a
distribution (docs/aws-kafka-mechanics.md §6). We let Maven resolve a server's runtime classpath from a tiny
generated POM, add our own short ``bin/`` scripts and log configs (``artifacts_data/``), and pack the result
with the official layout, so the agent installs it exactly like Apache's tarball. The agent itself ships as a
zipapp with its pinned dependency (kazoo) and bytecode, runnable in place by a bare ``python3.11``.

Every output lands in :attr:`CachePaths.artifacts_dir` with a ``.sha256`` beside it and a ``.recipe`` (the
digest of what it was built from); it is reused while both still match.
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from string import Template

import kafka_asg
from kafka_asg.config import ClusterConfig, ServerSpec
from kafka_asg.errors import ConfigError, HostError, NotFoundError, Unavailable
from kafka_asg.fsutil import atomic_write, sha256_file
from kafka_asg.paths import CachePaths
from kafka_asg.retry import Retry

logger = logging.getLogger(__name__)

AGENT_KEY = "agent/kafka-asg-agent.pyz"
AGENT_FILE = "kafka-asg-agent.pyz"
AGENT_SCRIPT = "kafka-asg-agent"
DATA_DIR = Path(__file__).parent / "artifacts_data"
PACKAGE_DIR = Path(kafka_asg.__file__).parent

# Bump to rebuild every archive when the packing itself changes (the recipe digest covers the rest).
RECIPE_FORMAT = "2"  # 2: archives gzipped at level 0 (see pack_tree)
ARCHIVE_GZIP_LEVEL = 0
# Changes to how the zipapp is built (not to what goes in) that must invalidate a cached one.
AGENT_BUILD_STEPS = "zipapp,pyc-legacy-unchecked-hash,agent-modules-only,stdlib-aws,pyc-stored"
# The parts of the kafka_asg package in the zipapp: the agent and what it imports (never the CLI).
AGENT_PACKAGE_PARTS = frozenset(
    {"__init__.py", "py.typed", "agent", "config.py", "errors.py", "fsutil.py", "paths.py", "retry.py", "s3get.py"}
)
DEPENDENCY_PLUGIN_VERSION = "3.8.1"
# dependency:copy 3.x reads each item's POM (and fails on a missing parent); 2.8 copies just the jar file.
JAR_ONLY_COPY_GOAL = "org.apache.maven.plugins:maven-dependency-plugin:2.8:copy"
SCALA_VERSION = "2.13"
# Every archive member gets this mtime (1980-01-01, the zip epoch) so equal inputs give equal archives.
FIXED_MTIME = 315532800
ZIP_EPOCH = time.gmtime(FIXED_MTIME)[:6]  # the same moment as a zip member's date_time

# Central serves zookeeper-3.8.7.pom but not the parent-3.8.7.pom it inherits its dependency versions from
# (404 on repo.maven.apache.org, checked 2026-11-25), so Maven cannot read 3.8.7's dependency list. Its
# module POM differs from 3.8.6's only in a provided-scope jline classifier, so we resolve the runtime
# classpath of the mapped release and swap in the requested version's own two jars.
ZOOKEEPER_DEPENDENCY_BASE: Mapping[str, str] = {"3.8.7": "3.8.6"}
ZOOKEEPER_OWN_JARS = ("zookeeper", "zookeeper-jute")

# Kafka 3.x logs through slf4j 1.7 + reload4j, as Apache's 3.9 tarball ships it (log4j 1 is gone since 3.2.0).
KAFKA3_LOG_BACKEND = (("org.slf4j", "slf4j-reload4j", "1.7.36"), ("ch.qos.reload4j", "reload4j", "1.2.25"))

# Kafka 4.x (KRaft only) logs through Log4j2. Its POMs pin slf4j-api 1.7.36, so the SLF4J binding must be
# log4j-slf4j-impl (StaticLoggerBinder, SLF4J 1.x); log4j-slf4j2-impl only registers an SLF4J 2 service provider,
# which slf4j-api 1.7 never looks for (it would fall back to the no-op logger: empty log files). The version
# is the log4j-core/log4j-api that kafka-server 4.4.0 declares, so no jar comes in two versions.
KRAFT_KAFKA_VERSION = "4.4.0"
KAFKA4_LOG4J2_VERSION = "2.25.5"
KAFKA4_LOG_BACKEND = tuple(
    ("org.apache.logging.log4j", a, KAFKA4_LOG4J2_VERSION) for a in ("log4j-slf4j-impl", "log4j-core", "log4j-api")
)

# Different artifacts that share a file stem (com.yammer.metrics vs io.dropwizard.metrics); Apache's tarball
# ships both too. Any other stem seen with two versions is a duplicate.
DISTINCT_SAME_STEM = frozenset({"metrics-core"})

# The agent's runtime dependencies, pinned from requirements.lock (moto, flask and dev tools stay out).
# The agent talks to AWS with the standard library (agent/aws.py): kazoo is its only dependency.
AGENT_REQUIREMENTS = ("kazoo",)

Progress = Callable[[str], None]


def _log_progress(message: str) -> None:
    logger.info("%s", message)


@dataclass(frozen=True)
class Artifact:
    """One bucket object."""

    key: str  # S3 key: cfg.zookeeper.archive_key / cfg.kafka.archive_key / AGENT_KEY
    path: Path
    sha256: str
    size: int


@dataclass(frozen=True)
class ArtifactSet:
    zookeeper: Artifact
    kafka: Artifact
    agent: Artifact

    @property
    def objects(self) -> dict[str, Path]:
        """S3 key -> local file, for ``ProvisionInputs.objects``."""
        return {a.key: a.path for a in (self.zookeeper, self.kafka, self.agent)}


# ============================================================================ recipes (pure)


@dataclass(frozen=True)
class Coordinate:
    group: str
    artifact: str
    version: str | None = None  # None: managed by the parent POM

    def xml(self, tag: str, indent: str) -> str:
        version = f"<version>{self.version}</version>" if self.version else ""
        ids = f"<groupId>{self.group}</groupId><artifactId>{self.artifact}</artifactId>"
        return f"{indent}<{tag}>{ids}{version}</{tag}>"


@dataclass(frozen=True)
class MavenRecipe:
    """How to build one server archive from Maven Central."""

    archive_name: str  # file name in the cache, e.g. kafka_2.13-3.9.2.tgz
    top_dir: str  # the archive's single top directory
    lib_dir: str  # "lib" (ZooKeeper) or "libs" (Kafka), as in Apache's tarballs
    data: str  # subdirectory of artifacts_data with bin/ and conf/ or config/
    parent: Coordinate | None
    dependencies: tuple[Coordinate, ...]
    exclude: tuple[str, ...] = ()  # artifactIds dropped from the resolved classpath
    extra_jars: tuple[Coordinate, ...] = ()  # copied without their dependencies

    @property
    def maven_goals(self) -> tuple[str, ...]:
        goals = ("dependency:copy-dependencies",)
        return (*goals, JAR_ONLY_COPY_GOAL) if self.extra_jars else goals


def zookeeper_recipe(version: str) -> MavenRecipe:
    base = ZOOKEEPER_DEPENDENCY_BASE.get(version, version)
    swap = base != version
    # Inherit ZooKeeper's parent POM so logback-classic and metrics-core come in the versions ZooKeeper was
    # built against; they are optional/provided in ZooKeeper's own POM, so they would not come transitively.
    return MavenRecipe(
        archive_name=f"apache-zookeeper-{version}-bin.tar.gz",
        top_dir=f"apache-zookeeper-{version}-bin",
        lib_dir="lib",
        data="zookeeper",
        parent=Coordinate("org.apache.zookeeper", "parent", base),
        dependencies=(
            Coordinate("org.apache.zookeeper", "zookeeper", base),
            Coordinate("ch.qos.logback", "logback-classic"),
            # Provided-scope jars the server loads anyway, as Apache's bin tarball ships them: the default
            # metrics provider needs Dropwizard's Reservoir, snapshot naming touches snappy, the tools commons-cli.
            Coordinate("io.dropwizard.metrics", "metrics-core"),
            Coordinate("org.xerial.snappy", "snappy-java"),
            Coordinate("commons-cli", "commons-cli"),
        ),
        exclude=ZOOKEEPER_OWN_JARS if swap else (),
        extra_jars=tuple(Coordinate("org.apache.zookeeper", a, version) for a in ZOOKEEPER_OWN_JARS) if swap else (),
    )


def kafka_recipe(version: str) -> MavenRecipe:
    if not version.startswith("3."):
        raise ConfigError(
            [f"kafka.version = {version!r}: only Kafka 3.x (ZooKeeper mode) archives can be built; use 3.9.2"]
        )
    return _kafka_distribution(version, data="kafka", log_backend=KAFKA3_LOG_BACKEND)


def kraft_kafka_recipe(version: str = KRAFT_KAFKA_VERSION) -> MavenRecipe:
    """Kafka 4.x for KRaft mode: the same official layout as 3.x, Log4j2 configs and KRaft tools (kafka-storage)."""
    if not version.startswith("4."):
        raise ConfigError([f"KRaft Kafka version {version!r}: only Kafka 4.x archives are built here; use 4.4.0"])
    return _kafka_distribution(version, data="kafka4", log_backend=KAFKA4_LOG_BACKEND)


def _kafka_distribution(version: str, *, data: str, log_backend: Iterable[tuple[str, str, str]]) -> MavenRecipe:
    """Apache's layout (``kafka_<scala>-<version>/libs``): the broker, the admin tools and a logging backend;
    ``data`` names the bin/ and config/ files under artifacts_data/."""
    name = f"kafka_{SCALA_VERSION}-{version}"
    return MavenRecipe(
        archive_name=f"{name}.tgz",
        top_dir=name,
        lib_dir="libs",
        data=data,
        parent=None,
        dependencies=(
            Coordinate("org.apache.kafka", f"kafka_{SCALA_VERSION}", version),
            # The admin CLIs (TopicCommand, ConsoleConsumer) live in kafka-tools since 3.5-3.7.
            Coordinate("org.apache.kafka", "kafka-tools", version),
            *(Coordinate(g, a, v) for g, a, v in log_backend),
        ),
    )


def kraft_archive_key(version: str = KRAFT_KAFKA_VERSION) -> str:
    """The bucket key of the 4.x archive, named like the 3.x one (``archives/<file name>``)."""
    return f"archives/{kraft_kafka_recipe(version).archive_name}"


def render_pom(recipe: MavenRecipe) -> str:
    parent = recipe.parent.xml("parent", "  ").replace("</parent>", "<relativePath/></parent>") if recipe.parent else ""
    return Template((DATA_DIR / "pom.xml.in").read_text()).substitute(
        parent=parent,
        artifact_id=re.sub(r"[^A-Za-z0-9_.-]", "-", recipe.top_dir),
        dependencies="\n".join(d.xml("dependency", "    ") for d in recipe.dependencies),
        plugin_version=DEPENDENCY_PLUGIN_VERSION,
        exclude_artifact_ids=",".join(recipe.exclude),
        artifact_items="\n".join(c.xml("artifactItem", "            ") for c in recipe.extra_jars),
    )


def _tree_files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".pyo"):
            yield path


def tree_digest(root: Path, extra: Iterable[str] = ()) -> str:
    """sha256 over the relative paths, executable bits and contents of the files under ``root``."""
    digest = hashlib.sha256()
    for item in extra:
        digest.update(item.encode() + b"\0")
    for path in _tree_files(root):
        digest.update(f"{path.relative_to(root).as_posix()}\0{os.access(path, os.X_OK)}\0".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def recipe_digest(recipe: MavenRecipe) -> str:
    return tree_digest(DATA_DIR / recipe.data, (RECIPE_FORMAT, render_pom(recipe), recipe.lib_dir, recipe.top_dir))


_JAR_NAME = re.compile(r"^(?P<stem>.+?)-(?P<version>\d[^-]*(?:-.*)?)\.jar$")


def duplicate_jars(names: Iterable[str]) -> list[str]:
    """Jar file names whose artifact appears with more than one version (one would shadow the other)."""
    versions: dict[str, list[str]] = {}
    for name in names:
        match = _JAR_NAME.match(name)
        stem = match.group("stem") if match else name
        versions.setdefault(stem, []).append(name)
    return sorted(n for stem, ns in versions.items() if len(ns) > 1 and stem not in DISTINCT_SAME_STEM for n in ns)


_RUN_CLASS = re.compile(r'kafka-run-class\.sh"?\s+(?P<cls>[A-Za-z_][\w.$]*)')


def script_main_classes(bin_dir: Path) -> dict[str, str]:
    """Script name -> the main class it hands to ``kafka-run-class.sh`` (scripts that run one)."""
    found: dict[str, str] = {}
    for script in sorted(bin_dir.glob("*.sh")):
        match = _RUN_CLASS.search(script.read_text())
        if match:
            found[script.name] = match.group("cls")
    return found


def missing_main_classes(classes: Mapping[str, str], jar_entries: Iterable[str]) -> list[str]:
    """``script: class`` for every script whose main class is in none of the jars (given their entry names)."""
    entries = set(jar_entries)
    return [f"{s}: {c}" for s, c in sorted(classes.items()) if c.replace(".", "/") + ".class" not in entries]


def maven_failure(output: str) -> Unavailable | HostError:
    """Classify a failed Maven run: network trouble is worth a retry, anything else is not."""
    tail = "\n".join([line for line in output.splitlines() if "[ERROR]" in line][:6]) or output[-2000:]
    transient = ("Could not transfer artifact", "Connection reset", "Connect to", "timed out", "Temporary failure")
    if any(t in output for t in transient):
        return Unavailable(f"maven could not download from Maven Central:\n{tail}")
    return HostError(
        f"maven failed:\n{tail}\nCheck that the versions in the config exist on https://repo.maven.apache.org "
        "(a release whose parent POM is missing needs an entry in artifacts.ZOOKEEPER_DEPENDENCY_BASE)."
    )


def agent_requirements(lock_text: str) -> list[str]:
    """``name==version`` pins for the agent's runtime dependencies, taken from requirements.lock."""
    pins: dict[str, str] = {}
    for raw in lock_text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[re.sub(r"[-_.]+", "-", name.strip().lower())] = version.strip()
    missing = [n for n in AGENT_REQUIREMENTS if n not in pins]
    if missing:
        raise ConfigError([f"requirements.lock pins no version of {', '.join(missing)}: add them (pip freeze)"])
    return [f"{n}=={pins[n]}" for n in AGENT_REQUIREMENTS]


# ============================================================================ the cache


def _sidecar(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def cached_artifact(key: str, path: Path, recipe: str, *, accept_stale: bool = False) -> Artifact | None:
    """The cached file if it is there and its content still matches its ``.sha256``, and it was built from
    ``recipe`` (or, with ``accept_stale``, from an older recipe: still a working file, just not the newest)."""
    sums, recipe_file = _sidecar(path, ".sha256"), _sidecar(path, ".recipe")
    if not (path.is_file() and sums.is_file() and recipe_file.is_file()):
        return None
    recorded = (sums.read_text().split() or [""])[0]
    actual = sha256_file(path)
    if actual != recorded:
        logger.warning("%s does not match its .sha256 (corrupt or truncated): not using it", path)
        return None
    if recipe_file.read_text().strip() != recipe:
        if not accept_stale:
            logger.info("%s was built from an older recipe or source: rebuilding", path.name)
            return None
        logger.warning("%s was built from an older recipe or source; `kafka-asg artifacts build` renews it", path)
    return Artifact(key=key, path=path, sha256=actual, size=path.stat().st_size)


def _record(key: str, path: Path, recipe: str) -> Artifact:
    sha = sha256_file(path)
    atomic_write(_sidecar(path, ".sha256"), f"{sha}  {path.name}\n")
    atomic_write(_sidecar(path, ".recipe"), recipe + "\n")
    return Artifact(key=key, path=path, sha256=sha, size=path.stat().st_size)


# ============================================================================ building (side effects)


@contextmanager
def build_lock(cache: CachePaths) -> Iterator[None]:
    """One build at a time per cache (``up`` and a test may race): builds share ``maven_work_dir``."""
    cache.root.mkdir(parents=True, exist_ok=True)
    with (cache.root / "build.lock").open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(cmd: Sequence[str], cwd: Path, what: str) -> None:
    logger.debug("%s: %s", what, " ".join(cmd))
    try:
        proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        hint = " (apt-get install maven)" if cmd[0] == "mvn" else " (pip install -e '.[dev]')"
        raise HostError(f"{what}: {cmd[0]} is not installed{hint}: {exc}") from exc
    if proc.returncode != 0:
        output = proc.stdout + proc.stderr
        if cmd[0] == "mvn":
            raise maven_failure(output)
        raise HostError(f"{what} failed (exit {proc.returncode}):\n{output[-3000:]}")


def _add_tree(tar: tarfile.TarFile, src: Path, arcname: str) -> None:
    """Add ``src`` with normalised metadata (root-owned, fixed mtime) so equal inputs give equal archives."""
    for path in [src, *sorted(src.rglob("*"))]:
        rel = path.relative_to(src).as_posix()
        info = tar.gettarinfo(str(path), arcname=arcname if rel == "." else f"{arcname}/{rel}")
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.mtime = FIXED_MTIME
        info.mode = 0o755 if path.is_dir() or os.access(path, os.X_OK) else 0o644
        if path.is_file():
            with path.open("rb") as fh:
                tar.addfile(info, fh)
        else:
            tar.addfile(info)


def pack_tree(src: Path, arcname: str, dest: Path) -> None:
    """Write ``src`` as ``dest`` (.tar.gz) with one top directory ``arcname``; atomic."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    try:
        # A fixed gzip header mtime too, so equal inputs give byte-identical archives. Level 0 (stored
        # blocks): the payload is jars, already deflated, so gzip -9 saves 7% of the size but costs every
        # node ~0.2 s of CPU to inflate at each install; stored, it is still a .tar.gz any tar reads.
        with (
            os.fdopen(fd, "wb") as raw,
            gzip.GzipFile(fileobj=raw, mode="wb", mtime=FIXED_MTIME, compresslevel=ARCHIVE_GZIP_LEVEL) as gz,
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):
            _add_tree(tar, src, arcname)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_server_archive(recipe: MavenRecipe, cache: CachePaths, progress: Progress = _log_progress) -> Path:
    """Resolve the jars with Maven, add scripts and configs, pack ``recipe.archive_name`` into the cache."""
    work = cache.maven_work_dir / recipe.top_dir
    shutil.rmtree(work, ignore_errors=True)
    stage = work / "stage" / recipe.top_dir
    libs = stage / recipe.lib_dir
    libs.mkdir(parents=True)
    atomic_write(work / "pom.xml", render_pom(recipe))
    cmd = ["mvn", "-B", "-q", "-f", str(work / "pom.xml"), *recipe.maven_goals, f"-DoutputDirectory={libs}"]
    started = time.monotonic()
    progress(f"resolving {recipe.top_dir} from Maven Central (first build downloads ~100 MB)")
    # Only network failures are retried (maven_failure); a missing artifact fails at once.
    Retry(deadline=600, max_tries=3, delay=5)(f"maven {recipe.top_dir}", lambda: _run(cmd, work, "maven"))
    jars = sorted(p.name for p in libs.glob("*.jar"))
    duplicates = duplicate_jars(jars)
    if duplicates:
        raise HostError(f"{recipe.top_dir}: the classpath has two versions of a jar: {', '.join(duplicates)}")
    shutil.copytree(DATA_DIR / recipe.data, stage, dirs_exist_ok=True)
    entries: list[str] = []
    for jar in libs.glob("*.jar"):
        with zipfile.ZipFile(jar) as zf:
            entries.extend(zf.namelist())
    missing = missing_main_classes(script_main_classes(stage / "bin"), entries)
    if missing:
        raise HostError(f"{recipe.top_dir}: bin scripts name main classes no jar has: {'; '.join(missing)}")
    dest = cache.artifacts_dir / recipe.archive_name
    pack_tree(stage, recipe.top_dir, dest)
    shutil.rmtree(work / "stage", ignore_errors=True)
    progress(
        f"built {dest.name}: {len(jars)} jars, {dest.stat().st_size / 1e6:.1f} MB in {time.monotonic() - started:.0f}s"
    )
    return dest


def _server_artifact(
    spec: ServerSpec, recipe: MavenRecipe, cache: CachePaths, build: bool = False, progress: Progress = _log_progress
) -> Artifact:
    if spec.source is not None:
        return _source_artifact(spec)
    return _maven_artifact(spec.archive_key, recipe, cache, build, progress)


def _maven_artifact(
    key: str,
    recipe: MavenRecipe,
    cache: CachePaths,
    build: bool = False,
    progress: Progress = _log_progress,
    *,
    command: str = "kafka-asg artifacts build",
) -> Artifact:
    path = cache.artifacts_dir / recipe.archive_name
    digest = recipe_digest(recipe)
    found = cached_artifact(key, path, digest, accept_stale=not build)
    if found is not None:
        return found
    if not build:
        raise NotFoundError(f"{recipe.archive_name} is not in {cache.artifacts_dir}: run `{command}`")
    with build_lock(cache):
        # Another process may have built it while we waited for the lock.
        found = cached_artifact(key, path, digest)
        if found is not None:
            return found
        build_server_archive(recipe, cache, progress)
        return _record(key, path, digest)


def _source_artifact(spec: ServerSpec) -> Artifact:
    """A user-supplied archive (``source`` in the config): taken as is."""
    assert spec.source is not None
    if "://" in spec.source:
        raise ConfigError([f"source = {spec.source!r}: URLs are not fetched; download the archive and give its path"])
    path = Path(spec.source).expanduser()
    if not path.is_file():
        raise NotFoundError(f"source archive {path} does not exist: fix `source` in the config or remove it")
    return Artifact(key=spec.archive_key, path=path, sha256=sha256_file(path), size=path.stat().st_size)


def project_root(package_dir: Path = PACKAGE_DIR) -> Path:
    """The source checkout the agent is built from (src layout: <root>/src/kafka_asg)."""
    root = package_dir.parent.parent
    if not (root / "pyproject.toml").is_file() or not (root / "requirements.lock").is_file():
        raise NotFoundError(
            f"building the agent needs the kafka-asg source checkout (pyproject.toml, requirements.lock) "
            f"above {package_dir}; run from a clone installed with `pip install -e .`"
        )
    return root


def agent_recipe(root: Path) -> str:
    """What the zipapp depends on: the package source, the lock file, and the pruning rules."""
    lock = (root / "requirements.lock").read_text()
    return tree_digest(
        PACKAGE_DIR,
        (
            RECIPE_FORMAT,
            *agent_requirements(lock),
            AGENT_BUILD_STEPS,
        ),
    )


def _console_script(root: Path, name: str) -> str:
    scripts = tomllib.loads((root / "pyproject.toml").read_text()).get("project", {}).get("scripts", {})
    if name not in scripts:
        raise ConfigError([f"pyproject.toml [project.scripts] has no {name!r}"])
    return str(scripts[name])


def build_agent(cache: CachePaths, root: Path, progress: Progress = _log_progress) -> Path:
    """Build the agent zipapp: the agent's part of this package plus its pinned runtime deps, with bytecode."""
    started = time.monotonic()
    dest = cache.artifacts_dir / AGENT_FILE
    dest.parent.mkdir(parents=True, exist_ok=True)
    # pip comes from the environment running us (.venv), not from PATH.
    python = str(Path(sys.executable).parent / "python")
    with tempfile.TemporaryDirectory(prefix="agent-build.", dir=cache.root) as tmp:
        app = Path(tmp) / "app"
        reqs = Path(tmp) / "requirements.txt"
        reqs.write_text("\n".join(agent_requirements((root / "requirements.lock").read_text())) + "\n")
        progress("installing the agent's pinned dependencies for the zipapp")
        pip = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        # --no-deps: exactly the pinned set, nothing the resolver would add.
        _run([*pip, "--target", str(app), "--no-deps", "--no-compile", "-r", str(reqs)], Path(tmp), "pip install")
        # The package is copied, not pip-installed: an in-tree build would write build/ into the checkout.
        shutil.copytree(PACKAGE_DIR, app / "kafka_asg", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        # Only what the agent imports (the operator side, the rehearsal and the seed stay out), and no test suites.
        for entry in (app / "kafka_asg").iterdir():
            if entry.name not in AGENT_PACKAGE_PARTS:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        shutil.rmtree(app / "kazoo" / "tests", ignore_errors=True)
        module, _, func = _console_script(root, AGENT_SCRIPT).partition(":")
        (app / "__main__.py").write_text(f"from {module} import {func}\n\nraise SystemExit({func}())\n")
        # Bytecode next to each module (-b), where zipimport looks for it: a new instance would otherwise compile
        # every module it imports at each start (zipimport caches nothing). unchecked-hash: the zip's members
        # carry a fixed date, and the zipapp never changes under its name without a new upload.
        _run(
            [python, "-m", "compileall", "-q", "-b", "-j", "0", "--invalidation-mode", "unchecked-hash", str(app)],
            Path(tmp),
            "compileall",
        )
        tmp_out = Path(tmp) / AGENT_FILE
        write_zipapp(app, tmp_out)
        shutil.move(str(tmp_out), dest)
    progress(f"built {dest.name}: {dest.stat().st_size / 1e6:.1f} MB in {time.monotonic() - started:.0f}s")
    return dest


def write_zipapp(app: Path, dest: Path, interpreter: str = "/usr/bin/env python3") -> int:
    """Zip ``app`` (which has a ``__main__.py``) into an executable zipapp (https://docs.python.org/3/library/
    zipapp.html): a shebang line, then the zip. Python imports from it in place (zipimport), so nothing is
    unpacked when an instance starts the agent. Members sorted, dated 1980-01-01 and mode 0644, so equal inputs
    give byte-identical files (``zipapp.create_archive`` keeps each file's mtime). Returns the member count."""
    files = sorted(p for p in app.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    with dest.open("wb") as fh:
        fh.write(f"#!{interpreter}\n".encode())
        with zipfile.ZipFile(fh, "w") as out:
            for path in files:
                info = zipfile.ZipInfo(path.relative_to(app).as_posix(), date_time=ZIP_EPOCH)
                # Bytecode stored, the rest deflated: zipimport would inflate every module it imports, 9 ms of each
                # agent start; the zipapp grows from 0.6 to 1.1 MB, a millisecond more of download.
                info.compress_type = zipfile.ZIP_STORED if path.suffix == ".pyc" else zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                out.writestr(info, path.read_bytes())
    dest.chmod(0o755)
    return len(files)


def _agent_artifact(cache: CachePaths, build: bool = False, progress: Progress = _log_progress) -> Artifact:
    path = cache.artifacts_dir / AGENT_FILE
    try:
        root: Path | None = project_root()
    except NotFoundError:
        if build:
            raise
        root = None  # an installed kafka-asg can still upload the zipapp built earlier from a checkout
    digest = agent_recipe(root) if root else ""
    found = cached_artifact(AGENT_KEY, path, digest, accept_stale=not build)
    if found is not None:
        return found
    if not build:
        raise NotFoundError(
            f"{AGENT_FILE} for the current source is not in {cache.artifacts_dir}: run `kafka-asg artifacts build`"
        )
    with build_lock(cache):
        found = cached_artifact(AGENT_KEY, path, digest)
        if found is not None:
            return found
        assert root is not None  # build=True raised above without a checkout
        build_agent(cache, root, progress)
        return _record(AGENT_KEY, path, digest)


def ensure_artifacts(
    cfg: ClusterConfig, cache: CachePaths | None = None, *, build: bool = True, progress: Progress = _log_progress
) -> ArtifactSet:
    """The three bucket objects for ``cfg``: cached ones when intact and current, else built.

    ``build=False`` never runs Maven or pip: it returns what is cached (also one built from an older source
    or recipe, with a warning) or raises :class:`NotFoundError` naming ``kafka-asg artifacts build``.
    """
    cache = cache or CachePaths.default()
    return ArtifactSet(
        zookeeper=_server_artifact(cfg.zookeeper, zookeeper_recipe(cfg.zookeeper.version), cache, build, progress),
        kafka=_server_artifact(cfg.kafka, kafka_recipe(cfg.kafka.version), cache, build, progress),
        agent=_agent_artifact(cache, build, progress),
    )


def ensure_kraft_kafka(
    cache: CachePaths | None = None,
    *,
    version: str = KRAFT_KAFKA_VERSION,
    build: bool = True,
    progress: Progress = _log_progress,
) -> Artifact:
    """The Kafka 4.x (KRaft) archive, key ``archives/kafka_2.13-<version>.tgz``: cached when intact and current,
    else built. Not part of :func:`ensure_artifacts` (ZooKeeper mode) until the config accepts mode "kraft".

    ``build=False`` never runs Maven: cached archive or :class:`NotFoundError` naming the command that builds it.
    """
    recipe = kraft_kafka_recipe(version)
    cache = cache or CachePaths.default()
    command = "kafka-asg artifacts build --kraft"
    return _maven_artifact(kraft_archive_key(version), recipe, cache, build, progress, command=command)


def cmd_artifacts(args: argparse.Namespace) -> int:
    """``kafka-asg artifacts build|list [--kraft]``: build (or reuse) the archives and the agent (with ``--kraft``
    also the Kafka 4.x archive), or show what is cached (the 4.x archive only when it is)."""
    from kafka_asg.config import load_config, seed_config

    cfg = seed_config() if args.config is None else load_config(Path(args.config))
    cache = CachePaths.default()
    if args.action == "build":
        artifacts = ensure_artifacts(cfg, cache, build=True, progress=lambda m: print(m, flush=True))
        rows: list[Artifact] = [artifacts.zookeeper, artifacts.kafka, artifacts.agent]
        if getattr(args, "kraft", False):
            rows.append(ensure_kraft_kafka(cache, build=True, progress=lambda m: print(m, flush=True)))
    else:
        rows = []
        lookups: list[tuple[str, Callable[[], Artifact]]] = [
            ("zookeeper", lambda: _server_artifact(cfg.zookeeper, zookeeper_recipe(cfg.zookeeper.version), cache)),
            ("kafka", lambda: _server_artifact(cfg.kafka, kafka_recipe(cfg.kafka.version), cache)),
            ("agent", lambda: _agent_artifact(cache)),
        ]
        for name, lookup in lookups:
            try:
                rows.append(lookup())
            except NotFoundError as exc:
                print(f"{name:<10} missing: {exc}")
        # Optional until mode "kraft" is supported: listed only when built.
        with suppress(NotFoundError):
            rows.append(ensure_kraft_kafka(cache, build=False))
    for a in rows:
        print(f"{a.key:<48} {a.size / 1e6:7.1f} MB  sha256:{a.sha256[:16]}  {a.path}")
    return 0
