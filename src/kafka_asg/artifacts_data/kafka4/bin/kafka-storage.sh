#!/bin/sh
# KRaft log directories: kafka-storage.sh random-uuid | format -t CLUSTER_ID -c server.properties [--standalone] | info
exec "$(dirname "$0")/kafka-run-class.sh" kafka.tools.StorageTool "$@"
