#!/usr/bin/env bash
# Services the test suite can use, installed only if missing (idempotent; safe to call on every CI run).
#
# PostgreSQL: tests/test_search.py::test_postgres_four_workers_hundred_trials starts its own throwaway cluster
# on 127.0.0.1 with initdb + pg_ctl (as the `postgres` user when run as root) and skips itself when the
# binaries are absent, so nothing is started here: this script only makes sure the binaries exist.
set -euo pipefail

have_postgres() {
    command -v pg_ctl >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null
}

if have_postgres; then
    echo "ci_services: PostgreSQL binaries present"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "ci_services: no apt-get here; the PostgreSQL test will be skipped" >&2
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo -n"
    else
        echo "ci_services: not root and no sudo; the PostgreSQL test will be skipped" >&2
        exit 0
    fi
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends postgresql >/dev/null
# Debian's package starts a system cluster on port 5432; the tests do not need it.
if command -v pg_lsclusters >/dev/null 2>&1; then
    pg_lsclusters --no-header 2>/dev/null | while read -r ver name _; do
        $SUDO pg_ctlcluster "$ver" "$name" stop 2>/dev/null || true
    done
fi
have_postgres && echo "ci_services: PostgreSQL installed"
