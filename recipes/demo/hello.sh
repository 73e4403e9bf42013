#!/bin/sh
# Installed by recipes/demo.toml as /usr/local/bin/hello: the demo VM's default command.
cat /etc/motd
echo "${GREETING:-hi} $*"
