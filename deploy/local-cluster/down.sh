#!/bin/sh
# Tears down what up.sh built: every process group it started, the namespaces, the
# bridge. The logs stay in the state directory.
set -eu
cd "$(dirname "$0")/../.."
exec "${PYTHON:-.venv/bin/python}" -m tests.system.multi_host down "$@"
