# Everything a newcomer needs on a fresh Debian 12, as root: `make run` and `make test`.
SHELL := /bin/bash
# Debian's own interpreter: the tests run the daemon as an unprivileged user, who must be able to
# execute the virtualenv's python (a python under /root would not do).
PYTHON ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || echo python3)
VENV ?= .venv
BIN := $(VENV)/bin

APT_RUN := python3-venv python3-dev gcc pkg-config libsystemd-dev libpq5
# debootstrap and systemd-container: tests/systemd boots a Debian 12 under systemd-nspawn.
APT_TEST := $(APT_RUN) strace rclone sqlite3 util-linux procps debootstrap systemd-container postgresql
APT_BENCH := $(APT_TEST) git git-annex rclone openssl

# Install the Debian packages that are missing (apt-get update first, and only when needed).
define apt_install
	@missing=$$(for p in $(1); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:" $$missing; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
endef

.PHONY: run test bench venv clean install uninstall docs

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

# The benchmark report (tests/bench/report.py): every benchmark with its peer, one table, and
# docs/benchmarks.md + docs/benchmarks.png. matplotlib draws the chart: a bench tool, not a runtime
# dependency. BENCH_FLAGS=--quick for a short development run.
BENCH_FLAGS ?=
bench: venv
	$(call apt_install,$(APT_BENCH))
	$(BIN)/python -c 'import matplotlib' 2>/dev/null || $(BIN)/pip install -q matplotlib
	$(BIN)/python tests/bench/report.py $(BENCH_FLAGS)

# cloudmanagerctl's man page and bash completion, generated from its argument parser (committed;
# tests/test_ctl_docs.py fails when they are not what the parser makes)
docs: venv
	$(BIN)/python -m cloudmanagerd.manpage docs/cloudmanagerctl.1 etc/bash-completion/cloudmanagerctl

clean:
	rm -rf $(VENV) build *.egg-info

# -- the system service: `make install` / `make uninstall`, as root (README: "Install as a service") --
# The program lives in its own virtualenv under /opt (FHS: add-on software packages), built with
# Debian's python3, and is linked into /usr/local/bin. The files `make install` owns (unit,
# sysusers and tmpfiles snippets) go to the /usr/local/lib/... directories that systemd reads
# for locally installed software, with less precedence than /etc: /etc is the operator's, where
# a same-named file or a `systemctl edit` drop-in overrides ours and survives a re-install. The operator's config is
# installed once and never overwritten. Offline: make install PIP_FLAGS="--no-index --find-links DIR"
INSTALL_PYTHON ?= /usr/bin/python3
INSTALL_VENV ?= /opt/cloudmanagerd
BINDIR ?= /usr/local/bin
UNITDIR ?= /usr/local/lib/systemd/system
SYSUSERSDIR ?= /usr/local/lib/sysusers.d
TMPFILESDIR ?= /usr/local/lib/tmpfiles.d
CONFDIR ?= /etc/cloudmanagerd
DOCDIR ?= /usr/local/share/doc/cloudmanagerd
MANDIR ?= /usr/local/share/man
COMPLETIONDIR ?= /usr/local/share/bash-completion/completions
PIP_FLAGS ?=
# Whether systemd is the running init (sd_booted): not in a chroot or a container build.
SYSTEMD_RUNNING = test -d /run/systemd/system

define need_root
	@test "$$(id -u)" = 0 || { echo "make $@: run this as root" >&2; exit 1; }
endef

install:
	$(need_root)
	@# procps: /bin/kill, for the unit's ExecReload=
	$(call apt_install,$(APT_RUN) procps)
	umask 022; test -x $(INSTALL_VENV)/bin/python || $(INSTALL_PYTHON) -m venv $(INSTALL_VENV)
	umask 022; $(INSTALL_VENV)/bin/pip install -q --disable-pip-version-check $(PIP_FLAGS) .
	install -d -m 0755 $(BINDIR) $(UNITDIR) $(SYSUSERSDIR) $(TMPFILESDIR) $(DOCDIR)
	ln -sfn $(INSTALL_VENV)/bin/cloudmanagerd $(BINDIR)/cloudmanagerd
	ln -sfn $(INSTALL_VENV)/bin/cloudmanagerctl $(BINDIR)/cloudmanagerctl
	sed -e 's|/usr/local/bin/|$(BINDIR)/|g' -e 's|/usr/local/share/doc/cloudmanagerd/|$(DOCDIR)/|g' \
	  systemd/cloudmanagerd.service > $(UNITDIR)/cloudmanagerd.service
	chmod 0644 $(UNITDIR)/cloudmanagerd.service
	install -m 0644 systemd/cloudmanagerd.sysusers $(SYSUSERSDIR)/cloudmanagerd.conf
	install -m 0644 systemd/cloudmanagerd.tmpfiles $(TMPFILESDIR)/cloudmanagerd.conf
	install -m 0644 README.md etc/config.yaml $(DOCDIR)/
	install -D -m 0644 docs/cloudmanagerctl.1 $(MANDIR)/man1/cloudmanagerctl.1
	install -D -m 0644 etc/bash-completion/cloudmanagerctl $(COMPLETIONDIR)/cloudmanagerctl
	systemd-sysusers $(SYSUSERSDIR)/cloudmanagerd.conf
	systemd-tmpfiles --create $(TMPFILESDIR)/cloudmanagerd.conf
	install -d -m 0755 $(CONFDIR)
	@# readable by the group: cloudmanagerctl finds the control socket in it
	if test -e $(CONFDIR)/config.yaml; then echo "kept the existing $(CONFDIR)/config.yaml"; \
	else install -m 0640 -o root -g cloudmanager etc/config.yaml $(CONFDIR)/config.yaml; fi
	if $(SYSTEMD_RUNNING); then systemctl daemon-reload; fi
	@echo "installed; start it with: systemctl enable --now cloudmanagerd (upgrades: systemctl restart cloudmanagerd)"

uninstall:
	$(need_root)
	if $(SYSTEMD_RUNNING) && test -f $(UNITDIR)/cloudmanagerd.service; then \
	  systemctl disable --now cloudmanagerd.service; fi
	rm -f $(UNITDIR)/cloudmanagerd.service $(SYSUSERSDIR)/cloudmanagerd.conf $(TMPFILESDIR)/cloudmanagerd.conf
	for b in cloudmanagerd cloudmanagerctl; do \
	  if test "$$(readlink $(BINDIR)/$$b)" = $(INSTALL_VENV)/bin/$$b; then rm -f $(BINDIR)/$$b; fi; done
	if test -f $(INSTALL_VENV)/pyvenv.cfg; then rm -rf $(INSTALL_VENV); fi
	rm -f $(DOCDIR)/README.md $(DOCDIR)/config.yaml $(MANDIR)/man1/cloudmanagerctl.1 $(COMPLETIONDIR)/cloudmanagerctl
	if test -d $(DOCDIR); then rmdir --ignore-fail-on-non-empty $(DOCDIR); fi
	if $(SYSTEMD_RUNNING); then systemctl daemon-reload; fi
	@echo "kept: $(CONFDIR) (config), /srv/cloudmanager (data), /var/lib/cloudmanagerd (catalog)," \
	  "drop-ins under /etc/systemd/system/cloudmanagerd.service.d, and user and group cloudmanager"
