#!/bin/sh
# Three mlgate hosts on this machine, each in a network namespace of its own
# (10.77.N.11-13 on a bridge 10.77.N.1/24), behind HAProxy (deploy/haproxy.cfg,
# checking /ready every 200 ms), sharing one redis-server and one Tansu broker.
# Prints the addresses and an API key. Needs root; installs haproxy if missing.
#   deploy/local-cluster/up.sh [--state DIR]     (default /tmp/mlgate-local-cluster)
#   deploy/local-cluster/down.sh [--state DIR]   stops everything, removes the namespaces
set -eu
cd "$(dirname "$0")/../.."
exec "${PYTHON:-.venv/bin/python}" -m tests.system.multi_host up "$@"
