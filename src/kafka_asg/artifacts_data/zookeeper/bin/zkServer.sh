#!/bin/sh
# Run a ZooKeeper server in the foreground: zkServer.sh start-foreground [zoo.cfg]
# (kafka-asg runs servers under its own supervisor, so only the foreground form exists).
# Honours JAVA_HOME, JVMFLAGS, SERVER_JVMFLAGS, ZOO_LOG_DIR, ZOOCFGDIR like upstream.
. "$(dirname "$0")/zkEnv.sh"
cmd=${1:-}
case "$cmd" in
  start-foreground) ;;
  *) echo "usage: $0 start-foreground [zoo.cfg]" >&2; exit 2 ;;
esac
ZOOCFG=${2:-$ZOOCFGDIR/zoo.cfg}
mkdir -p "$ZOO_LOG_DIR"
# A modest default heap; upstream's zkEnv.sh uses ZK_SERVER_HEAP (MB) the same way.
ZK_SERVER_HEAP=${ZK_SERVER_HEAP:-256}
exec "$JAVA" -Xmx"${ZK_SERVER_HEAP}"m \
  "-Dzookeeper.log.dir=$ZOO_LOG_DIR" "-Dzookeeper.log.file=zookeeper-server.log" \
  -XX:+HeapDumpOnOutOfMemoryError -XX:OnOutOfMemoryError='kill -9 %p' \
  -cp "$CLASSPATH" $JVMFLAGS $SERVER_JVMFLAGS \
  org.apache.zookeeper.server.quorum.QuorumPeerMain "$ZOOCFG"
