# cloudops: `make demo` and `make test` are the two commands a newcomer needs.
# Both run `setup` first, which is idempotent: apt packages that are missing, then
# a virtualenv from the system python3 (libvirt and guestfs bindings come from Debian).

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
INV := $(VENV)/bin/invoke
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export LIBGUESTFS_BACKEND ?= direct
export LIBGUESTFS_BACKEND_SETTINGS ?= force_tcg

# What a hypervisor's own cloudops (its metrics cron job, /opt/cloudops/venv) takes from Debian:
# `deploy` installs them on real hosts (cloudops/hosts/toolkit.py PACKAGES); the lab's hosts share
# this machine's /usr, so the machine has them too. (python3-wheel: building that cloudops wheel from a checkout.)
HOST_CLOUDOPS_PACKAGES := python3-wheel python3-venv python3-libvirt python3-yaml python3-jinja2 python3-cryptography \
	python3-bcrypt python3-nacl python3-cffi python3-decorator python3-deprecated python3-six

APT_PACKAGES := qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-clients \
	libvirt-daemon-driver-qemu python3-libvirt libguestfs-tools python3-guestfs \
	linux-image-amd64 busybox-static dropbear-bin openssh-server openssh-client \
	iproute2 dnsmasq-base python3-venv genisoimage syslinux syslinux-common extlinux \
	e2fsprogs iptables kmod cpio procps util-linux debootstrap etcd-server etcd-client ovmf dosfstools libxml2-utils bindfs \
	graphite-web gunicorn chromium python3-scapy libvirt-daemon-driver-lxc \
	$(HOST_CLOUDOPS_PACKAGES)

.PHONY: setup apt venv demo test test-unit test-integration test-lab bench clean lab-down

setup: apt venv

apt:
	@missing=$$(for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed$$' || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
		echo "setup: installing apt packages:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	else echo "setup: apt packages present"; fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	GRAPHITE_NO_PREFIX=1 $(PY) -m pip install -q -e '.[test,bench,etcd]'
	touch $@

demo: setup
	$(INV) demo

# TEST_WORKERS=2 (the default): two pytest-xdist workers, whole modules each, each with its own lab and state
# directory (about half the suite's time is one TCG guest on one core or a wait on a daemon): 20 min on a quiet
# 2-core machine against 51 min in one process. TEST_WORKERS=0 runs the suite in this process, as before; a
# loaded machine (load average 8-17 in a trial) made 5 migration-fault tests fail with two workers.
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -ra --durations=30 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# Unit tests need no lab, no QEMU and no libguestfs (tests/unit/conftest.py enforces it).
test-unit: setup
	$(PY) -m pytest -ra -m "not lab and not integration"

# Real QEMU, libguestfs and carbon on this machine, no lab.
test-integration: setup
	$(PY) -m pytest -ra -m integration

# A real lab of namespaced hypervisor hosts (root).
test-lab: setup
	$(PY) -m pytest -ra -m lab

bench: setup
	$(PY) bench/fanout.py
	$(PY) bench/provision.py
	$(PY) bench/customize.py
	$(PY) bench/planner.py
	$(PY) bench/metrics_ship.py
	$(PY) bench/metrics.py
	$(PY) bench/migrate.py
	$(PY) bench/day2.py
	$(PY) bench/failover.py
	$(PY) bench/peers.py
	$(PY) bench/distribute.py

lab-down: venv
	$(INV) lab.down

clean: lab-down
	rm -rf $(VENV) var
