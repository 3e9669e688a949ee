#!/usr/bin/env bash
# Installs and starts, as root, what some tests need from the system:
#   chromium  Debian's chromium (the report test opens report.html in it)
#   slurm     a one-node SLURM cluster (tests/cluster/slurm-up.sh)
# conftest.py runs it in the background when a test session starts, so that apt and the
# daemons' start-up overlap the other tests.
set -euo pipefail
for part in "$@"; do
    case "$part" in
        chromium)
            if ! command -v chromium >/dev/null; then
                apt-get update -qq
                DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
            fi ;;
        slurm) bash "$(dirname "$0")/cluster/slurm-up.sh" ;;
        *) echo "system-up.sh: unknown part '$part' (expected chromium or slurm)" >&2; exit 2 ;;
    esac
done
