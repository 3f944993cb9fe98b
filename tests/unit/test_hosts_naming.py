"""The pure parts of LinuxHosts: names, addresses, the source-check ruleset, mountinfo parsing."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

from kafka_asg.local.hostapi import VpcSpec
from kafka_asg.local.hosts import ec2_hostname, eni_ifname, nft_ruleset, parse_mountinfo, port_name, router_addresses


def test_port_names_fit_ifnamsiz_and_differ() -> None:
    names = {port_name(f"i-{n:017x}") for n in range(1000)}
    assert len(names) == 1000
    assert all(len(n) <= 15 for n in names)
    assert port_name("eni-0abc") == port_name("eni-0abc")


def test_eni_names_follow_al2023_not_eth1() -> None:
    assert [eni_ifname(i) for i in (1, 2)] == ["ens6", "ens7"]


def test_router_addresses_are_base_plus_one_with_prefixes_once() -> None:
    vpc = VpcSpec(IPv4Network("10.0.0.0/26"), (IPv4Network("10.0.0.0/28"), IPv4Network("10.0.0.16/28")))
    assert router_addresses(vpc) == ["10.0.0.1/26", "10.0.0.1/28", "10.0.0.17/28"]
    same = VpcSpec(IPv4Network("10.0.0.0/26"), (IPv4Network("10.0.0.0/26"),))
    assert router_addresses(same) == ["10.0.0.1/26"]


def test_ec2_hostname() -> None:
    assert ec2_hostname(IPv4Address("10.0.0.21")) == "ip-10-0-0-21"


def test_ruleset_checks_ip_and_arp_sources_per_port() -> None:
    rules = nft_ruleset()
    assert "iifname . ip saddr != @nic_ip counter drop" in rules
    assert "iifname . arp saddr ip != @nic_ip" in rules


def test_parse_mountinfo_decodes_escapes() -> None:
    text = (
        "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n"
        "90 27 7:3 / /srv/my\\040data rw,relatime - ext4 /dev/loop3 rw\n"
        "garbage\n"
    )
    assert parse_mountinfo(text) == [("254:0", "/"), ("7:3", "/srv/my data")]
