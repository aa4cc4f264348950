# l3net: `make run` sets the host up and serves the plugin; `make test` runs every test.
VENV := .venv
SHELL := /bin/bash

.PHONY: setup run test test-docker check unit bench bench-scale demo demo-down plugin install clean

setup:
	@scripts/setup.sh

run: setup
	$(VENV)/bin/l3net-plugin

test: setup
	L3NET_REQUIRE_E2E=1 $(VENV)/bin/pytest -q tests

# The Docker-facing end-to-end tests on another Docker, from Debian's own packages of the suite
# that ships it, in a nested Docker host (scripts/docker-bed.sh): DOCKER=20 (Debian 12),
# 26 (Debian 13), 28 (Debian unstable). TESTS=tests runs every test there; IPTABLES=legacy|nft
# picks the bed's iptables backend (default: the suite's, nft).
DOCKER ?= 26
test-docker: setup
	IPTABLES=$(IPTABLES) scripts/docker-bed.sh $(DOCKER) $(TESTS)

# The tests that need no service, root or kernel (pytest -m 'not etcd and not root and not
# docker and not bird'): seconds, on any machine with python3-venv; no apt, no etcd, no dockerd.
check:
	@[ -x $(VENV)/bin/pytest ] || { python3 -m venv $(VENV) && $(VENV)/bin/pip install -q -e '.[test]'; }
	$(VENV)/bin/pytest -q -m "not etcd and not root and not docker and not bird" tests

unit: setup
	$(VENV)/bin/pytest -q tests/unit

bench: setup
	$(VENV)/bin/python -m tests.bench
	$(VENV)/bin/python -m tests.bench_net

# N simulated hosts without dockerd (plugin, BIRD, firewall each; the socket driven as dockerd
# does): etcd traffic, latencies, rules, CPU and memory per N; one host with 2,000 endpoints;
# 100 agents on one etcd. L3NET_SCALE_N, _M, _ONE_HOST, _AGENTS, _IDLE: see tests/bench_scale.py.
bench-scale: setup
	$(VENV)/bin/python -m tests.bench_scale

demo: setup
	$(VENV)/bin/python scripts/demo.py

demo-down:
	$(VENV)/bin/python scripts/demo.py down

# The managed plugin l3net:latest, built and enabled on the local dockerd (scripts/build-plugin.sh;
# settings from L3NET_ETCD_ENDPOINTS, L3NET_ETCD_PREFIX, L3NET_HOST_IP, ... in the environment).
# Needs docker and python3-venv (debootstrap without a Debian image), not `make setup`.
plugin:
	scripts/build-plugin.sh

# l3net as a host service: a virtualenv in /opt/l3net, l3net-plugin and l3netctl in
# /usr/local/bin, the systemd unit and /etc/default/l3net (scripts/install.sh; PREFIX, BINDIR,
# UNITDIR, DEFAULTS override the places). Enables nothing.
install:
	scripts/install.sh

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis build dist
