#!/usr/bin/env bash
# Starts Debian's PostgreSQL on 127.0.0.1 (installing it if needed) and creates the role and
# database the tests share a study in; prints the storage URL for HWNAS_TEST_POSTGRES.
set -euo pipefail
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
if ! command -v pg_lsclusters >/dev/null; then
  as_root apt-get update -q >&2 && as_root apt-get install -y -q postgresql >&2
fi
read -r version cluster port status _ < <(pg_lsclusters -h | head -n 1)
if [ "$status" != online ]; then
  as_root pg_ctlcluster "$version" "$cluster" start >&2
fi
psql_admin() { as_root runuser -u postgres -- psql -p "$port" -v ON_ERROR_STOP=1 -qtAc "$1"; }
if [ "$(psql_admin "SELECT 1 FROM pg_roles WHERE rolname = 'hwnas'")" != 1 ]; then
  psql_admin "CREATE ROLE hwnas LOGIN PASSWORD 'hwnas'" >&2
fi
if [ "$(psql_admin "SELECT 1 FROM pg_database WHERE datname = 'hwnas_test'")" != 1 ]; then
  psql_admin "CREATE DATABASE hwnas_test OWNER hwnas" >&2
fi
echo "postgresql://hwnas:hwnas@127.0.0.1:$port/hwnas_test"
