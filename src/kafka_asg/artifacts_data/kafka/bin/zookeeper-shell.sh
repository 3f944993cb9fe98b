#!/bin/sh
# ZooKeeper shell with Kafka's TLS options: zookeeper-shell.sh host:port[/chroot] [-zk-tls-config-file F] [command]
exec "$(dirname "$0")/kafka-run-class.sh" org.apache.zookeeper.ZooKeeperMainWithTlsSupportForKafka -server "$@"
