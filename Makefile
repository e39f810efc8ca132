# Everything a newcomer needs on a fresh Debian 12, as root: `make run` and `make test`.
SHELL := /bin/bash
# Debian's own interpreter: the tests run the daemon as an unprivileged user, who must be able to
# execute the virtualenv's python (a python under /root would not do).
PYTHON ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || echo python3)
VENV ?= .venv
BIN := $(VENV)/bin

APT_RUN := python3-venv python3-dev gcc pkg-config libsystemd-dev
APT_TEST := $(APT_RUN) strace rclone sqlite3 util-linux procps
APT_BENCH := $(APT_TEST) git git-annex rclone openssl

# Install the Debian packages that are missing (apt-get update first, and only when needed).
define apt_install
	@missing=$$(for p in $(1); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:" $$missing; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
endef

.PHONY: run test bench venv clean

$(BIN)/.installed: setup.cfg pyproject.toml
	$(call apt_install,$(APT_RUN))
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/.installed

var/config.yaml:
	mkdir -p var/inbox var/remotes/first var/remotes/second
	cp etc/dev-config.yaml $@

run: venv var/config.yaml
	exec $(BIN)/cloudmanagerd -c var/config.yaml

test: venv
	$(call apt_install,$(APT_TEST))
	$(BIN)/python -m pytest

bench: venv
	$(call apt_install,$(APT_BENCH))
	$(BIN)/python tests/bench/ingest_bench.py

clean:
	rm -rf $(VENV) build *.egg-info
