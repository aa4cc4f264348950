# l3net: `make run` sets the host up and serves the plugin; `make test` runs every test.
VENV := .venv
SHELL := /bin/bash

.PHONY: setup run test unit bench demo demo-down plugin clean

setup:
	@scripts/setup.sh

run: setup
	$(VENV)/bin/l3net-plugin

test: setup
	L3NET_REQUIRE_E2E=1 $(VENV)/bin/pytest -q tests

unit: setup
	$(VENV)/bin/pytest -q tests/unit

bench: setup
	$(VENV)/bin/python -m tests.bench
	$(VENV)/bin/python -m tests.bench_net

demo: setup
	$(VENV)/bin/python scripts/demo.py

demo-down:
	$(VENV)/bin/python scripts/demo.py down

# The managed plugin l3net:latest, built and enabled on the local dockerd (scripts/build-plugin.sh;
# settings from L3NET_ETCD_ENDPOINTS, L3NET_ETCD_PREFIX, L3NET_HOST_IP, ... in the environment).
plugin: setup
	scripts/build-plugin.sh

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis build dist
