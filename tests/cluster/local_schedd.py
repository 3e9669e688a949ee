"""Snakemake with HTCondor's schedd replaced by LocalSchedd: a test double, no pool involved.

    python tests/cluster/local_schedd.py RECORD_FILE [snakemake arguments...]

Everything up to the schedd is real: snakemake-executor-plugin-htcondor builds each job's
submit description with the real htcondor2.Submit and follows the job through the real
htcondor2.JobEventLog. LocalSchedd.submit records the description (a JSON line in
RECORD_FILE), runs the job on this machine and writes the classic user-log events the
plugin parses: 000 submitted, 001 executing, then 005 terminated with the job's exit code.

With LOCAL_SCHEDD_HOLD_AFTER=<seconds>, the first submission of every training job is
treated as HTCondor treats a job past its allowed_job_duration: after that many seconds
the job gets SIGTERM (its KillSig) and the log gets 012 held.
"""

import itertools
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time

import htcondor2

_clusters = itertools.count(100)
_held_rules = set()
_lock = threading.Lock()


def _event(log, code, cluster, text):
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    with _lock, open(log, "a") as f:
        f.write(f"{code:03d} ({cluster:03d}.000.000) {stamp} {text}\n...\n")


TERMINATED = (
    "Job terminated.\n\t(1) Normal termination (return value {code})\n"
    + "".join(f"\t\tUsr 0 00:00:00, Sys 0 00:00:00  -  {w} Usage\n"
              for w in ("Run Remote", "Run Local", "Total Remote", "Total Local"))
    + "".join(f"\t0  -  {w}\n" for w in ("Run Bytes Sent By Job", "Run Bytes Received By Job",
                                         "Total Bytes Sent By Job", "Total Bytes Received By Job"))
).rstrip("\n")


class SubmitResult:
    def __init__(self, cluster):
        self._cluster = cluster

    def cluster(self):
        return self._cluster


class LocalSchedd:
    record = None

    def __init__(self, *args, **kwargs):
        pass

    def submit(self, description, *args, **kwargs):
        cluster = next(_clusters)
        submit = {key: str(description[key]) for key in description.keys()}
        with _lock, open(self.record, "a") as f:
            f.write(json.dumps({"cluster": cluster, **submit}) + "\n")
        _event(submit["log"], 0, cluster, "Job submitted from host: <127.0.0.1:9618?addrs=127.0.0.1-9618>")
        threading.Thread(target=self._run, args=(cluster, submit), daemon=True).start()
        return SubmitResult(cluster)

    def _run(self, cluster, submit):
        _event(submit["log"], 1, cluster, "Job executing on host: <127.0.0.1:9618?addrs=127.0.0.1-9618>")
        rule = os.path.basename(os.path.dirname(submit["output"]))
        hold_after = os.environ.get("LOCAL_SCHEDD_HOLD_AFTER")
        hold = hold_after and rule.startswith("train_") and rule not in _held_rules
        out, err = (submit[k].replace("$(ClusterId)", str(cluster)) for k in ("output", "error"))
        env = dict(os.environ, _CONDOR_JOB_AD=os.devnull)
        with open(out, "w") as stdout, open(err, "w") as stderr:
            job = subprocess.Popen([submit["executable"], *shlex.split(submit["arguments"])], stdout=stdout,
                                   stderr=stderr, env=env, start_new_session=True)
            try:
                code = job.wait(timeout=float(hold_after) if hold else None)
            except subprocess.TimeoutExpired:
                _held_rules.add(rule)
                os.killpg(job.pid, signal.SIGTERM)
                job.wait()
                _event(submit["log"], 12, cluster,
                       f"Job was held.\n\tThe job exceeded allowed job duration of {hold_after}\n\tCode 46 Subcode 0")
                return
        _event(submit["log"], 5, cluster, TERMINATED.format(code=code))

    def query(self, *args, **kwargs):
        return []

    def history(self, *args, **kwargs):
        return iter(())

    def act(self, *args, **kwargs):
        return None


if __name__ == "__main__":
    LocalSchedd.record = os.path.abspath(sys.argv[1])
    htcondor2.Schedd = LocalSchedd
    from snakemake.cli import main

    sys.argv = ["snakemake", *sys.argv[2:]]
    main()
