#!/bin/sh
# ZooKeeper shell: zkCli.sh [-server host:port] [command ...]
# Honours JAVA_HOME, JVMFLAGS, CLIENT_JVMFLAGS like upstream; logs go to stderr only.
. "$(dirname "$0")/zkEnv.sh"
ZK_CLIENT_HEAP=${ZK_CLIENT_HEAP:-128}
exec "$JAVA" -Xmx"${ZK_CLIENT_HEAP}"m "-Dlogback.configurationFile=$ZOOCFGDIR/logback-cli.xml" \
  -cp "$CLASSPATH" $JVMFLAGS $CLIENT_JVMFLAGS org.apache.zookeeper.ZooKeeperMain "$@"
