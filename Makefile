# mlgate: the two commands are `make run` and `make test`; both install what they need.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-dev
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install run test lint bench bench-quick bench-all bench-ingest bench-predict bench-protection bench-predict-protection bench-quality redis-server haproxy clean

# The Python the venv is made from: the first on PATH that is 3.11 or newer.
PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
	&& { echo $$p; break; }; done)

$(STAMP): pyproject.toml client/pyproject.toml
	@[ -n "$(PYTHON)" ] || { echo "mlgate needs Python 3.11 or newer on PATH (python3.11, python3.12, python3.13 or python3)" >&2; exit 1; }
	@# A venv made by an older Python (a failed first try) is made again, not reused.
	$(PY) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || $(PYTHON) -m venv --clear $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]' -e ./client
	touch $(STAMP)

install: $(STAMP)

# The tests start private redis-server instances; install the binary when missing.
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q redis-server; }

# The multi-host tests (tests/system/test_multi_host.py) put HAProxy in front of the hosts.
haproxy:
	@command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q haproxy; }

run: $(STAMP)
	$(VENV)/bin/mlgate serve --dev

lint: $(STAMP)
	$(VENV)/bin/ruff check mlgate config service schemas workers tests bench client
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy --disallow-untyped-defs --ignore-missing-imports client/mlgate_client

test: $(STAMP) redis-server haproxy lint
	$(VENV)/bin/pytest -q -p no:cacheprovider

# mlgate per core on workload.md traffic, each scenario beside its limit (~10 min);
# `make bench-quick` is the same in under 2 minutes. The older benchmarks follow.
bench: $(STAMP)
	$(PY) -m bench.workload

bench-quick: $(STAMP)
	$(PY) -m bench.workload --quick

bench-all: bench bench-ingest bench-predict bench-protection bench-predict-protection bench-quality

bench-ingest: $(STAMP)
	$(PY) -m bench.ingest --workers 2 --rounds 2

bench-predict: $(STAMP)
	$(PY) -m bench.predict

bench-protection: $(STAMP) redis-server
	$(PY) -m bench.protection --rounds 2

bench-predict-protection: $(STAMP) redis-server
	$(PY) -m bench.predict_protection --rounds 2

bench-quality: $(STAMP)
	$(PY) -m bench.quality_ingest --rounds 2

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache data
