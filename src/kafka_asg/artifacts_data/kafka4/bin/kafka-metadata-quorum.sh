#!/bin/sh
# The KRaft controller quorum: kafka-metadata-quorum.sh --bootstrap-server H:P describe --status | --replication
exec "$(dirname "$0")/kafka-run-class.sh" org.apache.kafka.tools.MetadataQuorumCommand "$@"
