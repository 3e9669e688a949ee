#!/usr/bin/env bash
# A real single-node SLURM (Debian's slurm-wlm 22.05) with accounting (slurmdbd on MariaDB,
# so that sacct works) and two fake GPUs, for the tests. Run as root; idempotent.
GPUS=2
set -euo pipefail
host=$(hostname)
if ! command -v slurmctld >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurm-wlm munge slurmdbd mariadb-server >/dev/null
fi
if sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
    scontrol show node | grep -q "Gres=gpu:$GPUS" && exit 0
    bash "$(dirname "$0")/slurm-down.sh"  # up with another node: start again with this one
    sleep 2
fi

mkdir -p /run/munge /run/mysqld /var/log/slurm /var/spool/slurmctld /var/spool/slurmd
chown munge:munge /run/munge
[ -f /etc/munge/munge.key ] || runuser -u munge -- /usr/sbin/mungekey --create
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged

chown mysql:mysql /run/mysqld
if ! mysqladmin ping >/dev/null 2>&1; then
    runuser -u mysql -- /usr/sbin/mariadbd --socket=/run/mysqld/mysqld.sock --pid-file=/run/mysqld/mysqld.pid \
        --bind-address=127.0.0.1 >/var/log/slurm/mariadb.log 2>&1 &
    for _ in $(seq 60); do mysqladmin ping >/dev/null 2>&1 && break; sleep 0.5; done
fi
mysql -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw';
          CREATE DATABASE IF NOT EXISTS slurm_acct_db; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"

cat > /etc/slurm/slurmdbd.conf <<CONF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
LogFile=/var/log/slurm/slurmdbd.log
PidFile=/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=slurmpw
CONF
chmod 600 /etc/slurm/slurmdbd.conf
pgrep -x slurmdbd >/dev/null || /usr/sbin/slurmdbd
for _ in $(seq 60); do sacctmgr -n show cluster >/dev/null 2>&1 && break; sleep 0.5; done

# No cgroups here: linuxproc tracking, no task plugin. The GPUs are GRES backed by copies of
# /dev/null, one device file each (a GRES without files registers 0 GPUs and the node goes INVAL;
# one file with Count=2 is refused).
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=stagewise
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageTRES=gres/gpu
AccountingStoreFlags=job_comment
ReturnToService=2
MinJobAge=600
KillWait=10
GresTypes=gpu
NodeName=$host CPUs=$(nproc) RealMemory=8000 Gres=gpu:$GPUS State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
for i in $(seq 0 $((GPUS - 1))); do [ -e "/dev/fakegpu$i" ] || mknod -m 666 "/dev/fakegpu$i" c 1 3; done
printf 'AutoDetect=off\nNodeName=%s Name=gpu File=/dev/fakegpu[0-%s]\n' "$host" "$((GPUS - 1))" > /etc/slurm/gres.conf
sacctmgr -i add cluster stagewise >/dev/null 2>&1 || true
sacctmgr -i add account ml >/dev/null 2>&1 || true
sacctmgr -i add user root Account=ml >/dev/null 2>&1 || true
pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld
pgrep -x slurmd >/dev/null || /usr/sbin/slurmd
for _ in $(seq 120); do sinfo -h -o %t | grep -qE '^idle' && exit 0; sleep 0.5; done
echo "slurm-up: the node did not become idle" >&2
sinfo >&2
exit 1
