"""The pure parts of kafka_asg.artifacts: recipes, POMs, the cache check, packing, pruning, lock pins."""

from __future__ import annotations

import argparse
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from kafka_asg import artifacts
from kafka_asg.artifacts import (
    AGENT_KEY,
    Artifact,
    ArtifactSet,
    agent_requirements,
    cached_artifact,
    cmd_artifacts,
    duplicate_jars,
    ensure_artifacts,
    ensure_kraft_kafka,
    kafka_recipe,
    kraft_archive_key,
    kraft_kafka_recipe,
    maven_failure,
    missing_main_classes,
    pack_tree,
    recipe_digest,
    render_pom,
    script_main_classes,
    zookeeper_recipe,
)
from kafka_asg.config import seed_config
from kafka_asg.errors import ConfigError, HostError, NotFoundError, Unavailable
from kafka_asg.fsutil import read_properties, sha256_file
from kafka_asg.paths import CachePaths

NS = {"m": "http://maven.apache.org/POM/4.0.0"}


def _deps(pom: str) -> list[tuple[str, str, str | None]]:
    root = ET.fromstring(pom)
    out = []
    for dep in root.findall("m:dependencies/m:dependency", NS):
        version = dep.find("m:version", NS)
        out.append(
            (
                dep.findtext("m:groupId", namespaces=NS) or "",
                dep.findtext("m:artifactId", namespaces=NS) or "",
                version.text if version is not None else None,
            )
        )
    return out


def test_kafka_pom_lists_broker_tools_and_reload4j_backend() -> None:
    pom = render_pom(kafka_recipe("3.9.2"))
    assert _deps(pom) == [
        ("org.apache.kafka", "kafka_2.13", "3.9.2"),
        ("org.apache.kafka", "kafka-tools", "3.9.2"),
        ("org.slf4j", "slf4j-reload4j", "1.7.36"),
        ("ch.qos.reload4j", "reload4j", "1.2.25"),
    ]
    assert ET.fromstring(pom).find("m:parent", NS) is None


def test_kafka_recipe_names_the_official_layout() -> None:
    recipe = kafka_recipe("3.9.2")
    assert (recipe.archive_name, recipe.top_dir, recipe.lib_dir) == ("kafka_2.13-3.9.2.tgz", "kafka_2.13-3.9.2", "libs")


def test_kafka_4_is_refused_with_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"3\.9\.2"):
        kafka_recipe("4.4.0")


def test_zookeeper_inherits_parent_so_logback_comes_in_the_built_against_version() -> None:
    recipe = zookeeper_recipe("3.8.6")
    root = ET.fromstring(render_pom(recipe))
    assert root.findtext("m:parent/m:version", namespaces=NS) == "3.8.6"
    assert _deps(render_pom(recipe)) == [
        ("org.apache.zookeeper", "zookeeper", "3.8.6"),
        ("ch.qos.logback", "logback-classic", None),
        ("io.dropwizard.metrics", "metrics-core", None),
        ("org.xerial.snappy", "snappy-java", None),
        ("commons-cli", "commons-cli", None),
    ]
    assert recipe.maven_goals == ("dependency:copy-dependencies",)
    assert (recipe.archive_name, recipe.top_dir, recipe.lib_dir) == (
        "apache-zookeeper-3.8.6-bin.tar.gz",
        "apache-zookeeper-3.8.6-bin",
        "lib",
    )


def test_zookeeper_387_resolves_386_tree_and_swaps_in_its_own_jars() -> None:
    recipe = zookeeper_recipe("3.8.7")
    pom = render_pom(recipe)
    root = ET.fromstring(pom)
    assert root.findtext("m:parent/m:version", namespaces=NS) == "3.8.6"
    assert root.findtext(".//m:excludeArtifactIds", namespaces=NS) == "zookeeper,zookeeper-jute"
    items = root.findall(".//m:artifactItem", NS)
    assert [(i.findtext("m:artifactId", namespaces=NS), i.findtext("m:version", namespaces=NS)) for i in items] == [
        ("zookeeper", "3.8.7"),
        ("zookeeper-jute", "3.8.7"),
    ]
    assert recipe.maven_goals[-1].endswith(":2.8:copy")
    assert recipe.top_dir == "apache-zookeeper-3.8.7-bin"


def test_recipe_digest_changes_with_version() -> None:
    assert recipe_digest(kafka_recipe("3.9.2")) != recipe_digest(kafka_recipe("3.9.1"))
    assert recipe_digest(kafka_recipe("3.9.2")) == recipe_digest(kafka_recipe("3.9.2"))


def test_duplicate_jars_flags_two_versions_of_one_artifact() -> None:
    names = ["zookeeper-3.8.4.jar", "zookeeper-3.8.7.jar", "zookeeper-jute-3.8.7.jar", "netty-common-4.1.1.Final.jar"]
    assert duplicate_jars(names) == ["zookeeper-3.8.4.jar", "zookeeper-3.8.7.jar"]


def test_duplicate_jars_allows_distinct_artifacts_with_one_stem() -> None:
    # com.yammer.metrics:metrics-core and io.dropwizard.metrics:metrics-core, as in Apache's Kafka tarball.
    assert duplicate_jars(["metrics-core-2.2.0.jar", "metrics-core-4.1.12.1.jar", "kafka_2.13-3.9.2.jar"]) == []


def test_maven_failure_retries_network_trouble_only() -> None:
    net = "[ERROR] Could not transfer artifact x:y:pom:1 from/to central: Connection reset"
    assert isinstance(maven_failure(net), Unavailable)
    missing = "[ERROR] Could not find artifact org.apache.zookeeper:parent:pom:3.8.9 in central"
    err = maven_failure(missing)
    assert isinstance(err, HostError)
    assert "parent:pom:3.8.9" in str(err)
    assert "repo.maven.apache.org" in str(err)


def test_agent_requirements_pins_exactly_the_runtime_set() -> None:
    lock = "\n".join(["boto3==1.44.8", "botocore==1.44.8", "moto==5.2.5", "kazoo==2.11.0  # comment", "six==1.17.0"])
    # The agent talks to AWS with the standard library (agent/aws.py): no boto3, no botocore.
    assert agent_requirements(lock) == ["kazoo==2.11.0"]


def test_agent_requirements_names_what_the_lock_lacks() -> None:
    with pytest.raises(ConfigError, match="kazoo"):
        agent_requirements("boto3==1\nbotocore==1\n")


def test_the_real_lock_pins_the_agent_set() -> None:
    pins = agent_requirements((Path(__file__).parents[2] / "requirements.lock").read_text())
    assert len(pins) == len(artifacts.AGENT_REQUIREMENTS)
    assert not any(p.lower().startswith(("moto", "flask")) for p in pins)


def _cached(tmp_path: Path, content: bytes = b"archive") -> Path:
    path = tmp_path / "a.tgz"
    path.write_bytes(content)
    (tmp_path / "a.tgz.sha256").write_text(f"{sha256_file(path)}  a.tgz\n")
    (tmp_path / "a.tgz.recipe").write_text("r1\n")
    return path


def test_cached_artifact_reused_when_intact(tmp_path: Path) -> None:
    path = _cached(tmp_path)
    found = cached_artifact("archives/a.tgz", path, "r1")
    assert found == Artifact("archives/a.tgz", path, sha256_file(path), len(b"archive"))


def test_cached_artifact_rejected_when_truncated(tmp_path: Path) -> None:
    path = _cached(tmp_path)
    path.write_bytes(b"arch")
    assert cached_artifact("k", path, "r1") is None


def test_cached_artifact_rejected_when_recipe_changed(tmp_path: Path) -> None:
    assert cached_artifact("k", _cached(tmp_path), "r2") is None


def test_cached_artifact_from_older_recipe_accepted_when_asked(tmp_path: Path) -> None:
    found = cached_artifact("k", _cached(tmp_path), "r2", accept_stale=True)
    assert found is not None
    assert found.size == len(b"archive")


def test_stale_acceptance_never_accepts_a_corrupt_file(tmp_path: Path) -> None:
    path = _cached(tmp_path)
    path.write_bytes(b"archivX")
    assert cached_artifact("k", path, "r2", accept_stale=True) is None


def test_cached_artifact_rejected_without_checksum(tmp_path: Path) -> None:
    path = _cached(tmp_path)
    (tmp_path / "a.tgz.sha256").unlink()
    assert cached_artifact("k", path, "r1") is None


def test_pack_tree_is_reproducible_and_keeps_exec_bits(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "bin").mkdir(parents=True)
    (src / "bin" / "run.sh").write_text("#!/bin/sh\n")
    (src / "bin" / "run.sh").chmod(0o700)
    (src / "conf.txt").write_text("x=1\n")
    pack_tree(src, "top-1.0", tmp_path / "one.tgz")
    pack_tree(src, "top-1.0", tmp_path / "two.tgz")
    assert (tmp_path / "one.tgz").read_bytes() == (tmp_path / "two.tgz").read_bytes()
    with tarfile.open(tmp_path / "one.tgz") as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert sorted(members) == ["top-1.0", "top-1.0/bin", "top-1.0/bin/run.sh", "top-1.0/conf.txt"]
    assert members["top-1.0/bin/run.sh"].mode == 0o755
    assert members["top-1.0/conf.txt"].mode == 0o644
    assert members["top-1.0/conf.txt"].uname == "root"


def test_artifact_set_objects_maps_keys_to_paths(tmp_path: Path) -> None:
    def art(key: str) -> Artifact:
        return Artifact(key, tmp_path / key.rsplit("/", 1)[-1], "0" * 64, 1)

    s = ArtifactSet(art("archives/zk.tar.gz"), art("archives/kafka.tgz"), art(AGENT_KEY))
    assert s.objects == {
        "archives/zk.tar.gz": tmp_path / "zk.tar.gz",
        "archives/kafka.tgz": tmp_path / "kafka.tgz",
        AGENT_KEY: tmp_path / "kafka-asg-agent.pyz",
    }


def test_ensure_without_build_on_empty_cache_names_the_command(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="kafka-asg artifacts build"):
        ensure_artifacts(seed_config(), CachePaths(tmp_path), build=False)
    assert not (tmp_path / "maven").exists()


def test_list_on_empty_cache_names_each_missing_artifact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KAFKA_ASG_CACHE_DIR", str(tmp_path))
    assert cmd_artifacts(argparse.Namespace(action="list", config=None)) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines()] == ["zookeeper", "kafka", "agent"]
    assert out.count("run `kafka-asg artifacts build`") == 3


# ---------------------------------------------------------------------------- Kafka 4.x (KRaft)


def test_kraft_pom_lists_broker_tools_and_the_slf4j1_log4j2_binding() -> None:
    pom = render_pom(kraft_kafka_recipe("4.4.0"))
    # Kafka 4.4 pins slf4j-api 1.7.36: the binding must be log4j-slf4j-impl, not log4j-slf4j2-impl.
    assert _deps(pom) == [
        ("org.apache.kafka", "kafka_2.13", "4.4.0"),
        ("org.apache.kafka", "kafka-tools", "4.4.0"),
        ("org.apache.logging.log4j", "log4j-slf4j-impl", "2.25.5"),
        ("org.apache.logging.log4j", "log4j-core", "2.25.5"),
        ("org.apache.logging.log4j", "log4j-api", "2.25.5"),
    ]
    assert ET.fromstring(pom).find("m:parent", NS) is None


def test_kraft_recipe_names_the_official_layout_and_key() -> None:
    recipe = kraft_kafka_recipe()
    assert (recipe.archive_name, recipe.top_dir, recipe.lib_dir) == ("kafka_2.13-4.4.0.tgz", "kafka_2.13-4.4.0", "libs")
    assert recipe.maven_goals == ("dependency:copy-dependencies",)
    assert kraft_archive_key() == "archives/kafka_2.13-4.4.0.tgz"


def test_kraft_recipe_refuses_3x_with_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"4\.4\.0"):
        kraft_kafka_recipe("3.9.2")


def test_kraft_and_zookeeper_mode_recipes_differ() -> None:
    assert recipe_digest(kraft_kafka_recipe("4.4.0")) != recipe_digest(kraft_kafka_recipe("4.3.0"))
    assert kraft_kafka_recipe().data != kafka_recipe("3.9.2").data


KRAFT_DATA = artifacts.DATA_DIR / kraft_kafka_recipe().data


def test_kraft_scripts_name_the_4x_main_classes() -> None:
    assert script_main_classes(KRAFT_DATA / "bin") == {
        "kafka-console-consumer.sh": "org.apache.kafka.tools.consumer.ConsoleConsumer",
        "kafka-console-producer.sh": "org.apache.kafka.tools.ConsoleProducer",
        "kafka-metadata-quorum.sh": "org.apache.kafka.tools.MetadataQuorumCommand",
        "kafka-server-start.sh": "kafka.Kafka",
        "kafka-storage.sh": "kafka.tools.StorageTool",
        "kafka-topics.sh": "org.apache.kafka.tools.TopicCommand",
    }


def test_kraft_scripts_configure_log4j2_not_log4j1() -> None:
    scripts = {p.name: p.read_text() for p in (KRAFT_DATA / "bin").glob("*.sh")}
    assert all(text.startswith("#!/bin/sh\n") for text in scripts.values())
    assert all((KRAFT_DATA / "bin" / name).stat().st_mode & 0o111 for name in scripts)
    assert "-Dlog4j2.configurationFile=$base_dir/config/log4j2.properties" in scripts["kafka-server-start.sh"]
    assert "-Dlog4j2.configurationFile=$base_dir/config/tools-log4j2.properties" in scripts["kafka-run-class.sh"]
    assert not any("-Dlog4j.configuration=" in text for text in scripts.values())
    configs = sorted(p.name for p in (KRAFT_DATA / "config").iterdir())
    assert configs == ["log4j2.properties", "server.properties", "tools-log4j2.properties"]


def test_kraft_sample_config_is_a_combined_node() -> None:
    props = read_properties((KRAFT_DATA / "config" / "server.properties").read_text())
    assert props["process.roles"] == "broker,controller"
    assert "controller.quorum.bootstrap.servers" in props
    assert "zookeeper.connect" not in props


def test_missing_main_classes_names_script_and_class() -> None:
    classes = {"a.sh": "kafka.Kafka", "b.sh": "org.apache.kafka.tools.Gone"}
    entries = ["kafka/Kafka.class", "org/apache/kafka/tools/TopicCommand.class"]
    assert missing_main_classes(classes, entries) == ["b.sh: org.apache.kafka.tools.Gone"]


def test_ensure_kraft_without_build_names_the_kraft_command(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match=r"kafka-asg artifacts build --kraft"):
        ensure_kraft_kafka(CachePaths(tmp_path), build=False)
    assert not (tmp_path / "maven").exists()


def test_ensure_kraft_reuses_an_intact_cached_archive(tmp_path: Path) -> None:
    cache = CachePaths(tmp_path)
    recipe = kraft_kafka_recipe()
    path = cache.artifacts_dir / recipe.archive_name
    path.parent.mkdir(parents=True)
    path.write_bytes(b"kraft archive")
    (path.parent / f"{path.name}.sha256").write_text(f"{sha256_file(path)}  {path.name}\n")
    (path.parent / f"{path.name}.recipe").write_text(recipe_digest(recipe) + "\n")
    found = ensure_kraft_kafka(cache, build=True)  # current and intact: no Maven run
    assert found == Artifact("archives/kafka_2.13-4.4.0.tgz", path, sha256_file(path), len(b"kraft archive"))
    assert not (tmp_path / "maven").exists()


def test_list_shows_the_kraft_archive_only_when_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KAFKA_ASG_CACHE_DIR", str(tmp_path))
    cmd_artifacts(argparse.Namespace(action="list", config=None, kraft=False))
    assert "kafka_2.13-4.4.0" not in capsys.readouterr().out
    path = CachePaths(tmp_path).artifacts_dir / "kafka_2.13-4.4.0.tgz"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"x")
    (path.parent / f"{path.name}.sha256").write_text(f"{sha256_file(path)}  {path.name}\n")
    (path.parent / f"{path.name}.recipe").write_text(recipe_digest(kraft_kafka_recipe()) + "\n")
    assert cmd_artifacts(argparse.Namespace(action="list", config=None, kraft=False)) == 0
    assert "archives/kafka_2.13-4.4.0.tgz" in capsys.readouterr().out


def test_cli_accepts_kraft_flag() -> None:
    from kafka_asg.cli import build_parser

    args = build_parser().parse_args(["artifacts", "build", "--kraft"])
    assert (args.action, args.kraft) == ("build", True)
    assert build_parser().parse_args(["artifacts", "list"]).kraft is False
