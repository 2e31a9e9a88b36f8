#!/usr/bin/env bash
# Install a Prometheus server (Debian's `prometheus` package) for tests/ray/test_prometheus.py.
# Idempotent: does nothing when `prometheus` is already on PATH. Never starts the system
# service: a temporary policy-rc.d refuses every invoke-rc.d start during the install (the
# test runs its own server on loopback). Needs root (or sudo) and apt.
set -euo pipefail

if ! command -v prometheus >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        SUDO="sudo"
    fi
    export DEBIAN_FRONTEND=noninteractive

    # policy-rc.d exit 101 = "action forbidden": the package's postinst cannot start the service.
    policy=/usr/sbin/policy-rc.d
    backup=""
    if [ -e "$policy" ]; then
        backup="$(mktemp)"
        $SUDO cp -p "$policy" "$backup"
    fi
    restore_policy() {
        if [ -n "$backup" ]; then
            $SUDO mv -f "$backup" "$policy"
        else
            $SUDO rm -f "$policy"
        fi
    }
    trap restore_policy EXIT
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod 755 "$policy"

    # apt-get update only when the package lists do not know prometheus yet.
    if ! apt-cache show prometheus >/dev/null 2>&1; then
        $SUDO apt-get update -q
    fi
    $SUDO apt-get install -y -q --no-install-recommends prometheus
fi

prometheus --version 2>&1 | head -n 1
