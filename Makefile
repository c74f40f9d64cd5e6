# Tollgate — set-up, demo, tests and benchmarks on a Debian 12 host, as root.
#
#   make demo    the lab (agent, appliance and database namespaces) with Tollgate in it
#   make lint    ruff (rules in pyproject.toml) and the import contracts (.importlinter)
#   make test    lint, then the whole test suite
#   make bench   pgbench through Tollgate vs direct vs pgbouncer, as ratios
#   make verifier  dist/tollgate-verify.pyz: the auditor's standalone bundle verifier
#   make wheelhouse  build/wheelhouse: Tollgate and its dependencies as wheels, which the
#                    Ansible role (ansible/) installs on gateways that have no internet
#
# Each target installs what it needs first: Debian packages, the kernel-headers link bcc
# compiles against, and a venv that sees Debian's python3-bpfcc.

SHELL        := /bin/bash
VENV         ?= .venv
PY           := $(VENV)/bin/python
TOLLGATE     := $(VENV)/bin/tollgate
KERNEL       := $(shell uname -r)
APT_PACKAGES := nftables iproute2 procps python3-venv python3-dev python3-bpfcc bpfcc-tools \
                linux-headers-amd64 pgbouncer postgresql-client-15 chromium chromium-driver \
                rsyslog rsyslog-gnutls systemd debootstrap openssh-client
PG_BINDIR    := /usr/lib/postgresql/15/bin
PYTEST_ARGS  ?=

.PHONY: demo demo-down test bench host-deps venv lint clean verifier wheelhouse

demo: host-deps venv
	$(TOLLGATE) lab up --name demo
	@$(TOLLGATE) lab status --name demo --next-steps

demo-down: venv
	$(TOLLGATE) lab down --name demo

test: host-deps venv lint
	$(PY) -m pytest $(PYTEST_ARGS)

bench: host-deps venv
	$(PY) -m bench $(BENCH_ARGS)

# Debian packages, PostgreSQL 15 without a default cluster (nothing may listen in the root
# namespace), and the headers bcc compiles against linked for the running kernel.
host-deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ ! -x $(PG_BINDIR)/postgres ]; then \
	  mkdir -p /etc/postgresql-common; \
	  echo 'create_main_cluster = false' > /etc/postgresql-common/createcluster.conf; \
	  missing="$$missing postgresql-15"; \
	fi; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi
	@hdr=$$(ls -d /usr/src/linux-headers-*-amd64 | sort -V | tail -n1); \
	common=$$(ls -d /usr/src/linux-headers-*-common | sort -V | tail -n1); \
	mkdir -p /lib/modules/$(KERNEL); \
	[ -e /lib/modules/$(KERNEL)/build ] || ln -sfn $$hdr /lib/modules/$(KERNEL)/build; \
	[ -e /lib/modules/$(KERNEL)/source ] || ln -sfn $$common /lib/modules/$(KERNEL)/source

venv: $(VENV)/.installed

# setup.py builds the C extensions (appliance/masking/_fastrows.c, appliance/pgwire/_runs.c)
# in place: the editable install rebuilds them when a source changes.
$(VENV)/.installed: setup.cfg pyproject.toml setup.py appliance/masking/_fastrows.c appliance/pgwire/_runs.c
	/usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[fast,test,lint]'
	touch $@

# The auditor's verifier as one zipapp: the audit modules it needs, the PAN detector, and
# nothing else of the appliance (it needs only python3 and python3-cryptography).
VERIFIER_PYZ   ?= dist/tollgate-verify.pyz
VERIFIER_BUILD ?= build/verifier
VERIFIER_SRC   := appliance/__init__.py appliance/pan/__init__.py appliance/pan/detector.py \
                  $(addprefix appliance/audit/,__init__.py canonical.py merkle.py note.py trust.py cosignature.py witness_protocol.py \
                    bundle_layout.py bundle_reader.py verifier.py verify_chain.py verify_evidence.py verify_members.py verify_pan.py \
                    verify_records.py verify_report.py verify_signed.py verify_walk.py verify_workers.py)

verifier: $(VERIFIER_PYZ)

$(VERIFIER_PYZ): $(VERIFIER_SRC) Makefile
	rm -rf $(VERIFIER_BUILD)
	mkdir -p $(VERIFIER_BUILD)/appliance/audit $(VERIFIER_BUILD)/appliance/pan $(dir $@)
	cp appliance/__init__.py $(VERIFIER_BUILD)/appliance/
	cp $(filter appliance/audit/%,$(VERIFIER_SRC)) $(VERIFIER_BUILD)/appliance/audit/
	cp appliance/pan/__init__.py appliance/pan/detector.py $(VERIFIER_BUILD)/appliance/pan/
	printf 'import sys\nfrom appliance.audit.verifier import main\nsys.exit(main())\n' > $(VERIFIER_BUILD)/__main__.py
	python3 -m zipapp $(VERIFIER_BUILD) -o $@ -p '/usr/bin/env python3'
	@echo "built $@ (run: python3 $@ BUNDLE --root-key KEY)"

# The gateways' air-gapped install (ansible/roles/tollgate): every wheel Tollgate needs,
# built for Debian 12's Python 3.11 (this host's), into a fresh directory swapped in whole.
WHEELHOUSE ?= build/wheelhouse

wheelhouse: venv
	rm -rf $(WHEELHOUSE).tmp
	$(PY) -m pip wheel -q --wheel-dir $(WHEELHOUSE).tmp '.[fast]'
	rm -rf $(WHEELHOUSE)
	mv $(WHEELHOUSE).tmp $(WHEELHOUSE)
	@echo "built $(WHEELHOUSE) ($$(ls $(WHEELHOUSE) | wc -l) wheels)"

# ruff over every Python tree, the eBPF loaders included once bpf/ has any, then the layering
# contracts. lint-imports keeps no cache directory: its graph builds in a fraction of a second.
LINT_PATHS := appliance webui bench tests $(wildcard bpf/*.py)

lint: venv
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/lint-imports --no-cache --no-logo

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis .ruff_cache appliance/masking/_fastrows.*.so appliance/pgwire/_runs.*.so
