# One-command set-up: every target below creates .venv and installs what is missing.
SYSTEM_PYTHON ?= /usr/bin/python3
VENV          := .venv
PY            := $(VENV)/bin/python
STAMP         := $(VENV)/.installed-stamp
DEBIAN_PKGS   := python3-venv python3-pip mininet bridge-utils ethtool iputils-ping tcpdump iproute2 nftables \
                 postgresql

P4C           ?= p4c-bm2-ss
P4_K          := 64 256 1024

.PHONY: run bench test test-fast test-long lint p4 topo system-deps clean

# The headline experiment: 4 workers train on digits through the switch and with gloo
# (Mininet with 20 Mbit/s links when root, loopback otherwise); summary and plots in runs/.
run: $(STAMP)
	$(VENV)/bin/switchreduce run experiments/configs/headline.toml

# Four workers allreduce 10 M float32 through the soft switch on loopback, 1% loss.
bench: $(STAMP)
	$(VENV)/bin/switchreduce bench allreduce --workers 4 --elements 10000000 --loss 0.01

# A Mininet star of 4 worker hosts around the switch (root): ping, then an allreduce.
topo: $(STAMP)
	$(VENV)/bin/switchreduce topo --workers 4

test: $(STAMP)
	$(PY) -m pytest

# The unit tier: tests marked fast need no processes, namespaces or network (seconds).
test-fast: $(STAMP)
	$(PY) -m pytest -m fast

# The README's long commands as written: whole experiments, Mininet benchmarks (root).
test-long: $(STAMP)
	$(PY) -m pytest -m long tests/test_readme.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# The P4 program for each K, and its P4Info, into p4src/build/ (needs p4c, not in any registry).
p4:
	@command -v $(P4C) >/dev/null || { echo "make p4: $(P4C) not found on PATH." \
	  "Build p4c (github.com/p4lang/p4c, v1.2.4.8 fits Debian 12) and put p4c-bm2-ss on PATH."; exit 1; }
	mkdir -p p4src/build
	for k in $(P4_K); do \
	  $(P4C) --arch v1model -DK=$$k -o p4src/build/switchreduce_k$$k.json \
	    --p4runtime-files p4src/build/switchreduce_k$$k.p4info.txtpb p4src/switchreduce.p4 || exit 1; \
	done

# Debian packages, installed only when running as root and something is missing.
system-deps:
	@missing=$$(for p in $(DEBIAN_PKGS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:" $$missing; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else \
	    echo "not root: skipping Debian packages" $$missing "(Mininet tests will be skipped)"; \
	  fi; \
	fi

$(STAMP): pyproject.toml setup.py emulation/softswitch/_engine.c worker/_window.c
	$(MAKE) system-deps
	test -x $(PY) || $(SYSTEM_PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) p4src/build .pytest_cache
