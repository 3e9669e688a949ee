#!/usr/bin/env bash
# Stop the daemons that slurm-up.sh started, in reverse order, by their pid files.
set -u
for pidfile in /run/slurmd.pid /run/slurmctld.pid /run/slurmdbd.pid /run/mysqld/mysqld.pid; do
    [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null
done
pkill -x munged 2>/dev/null
exit 0
