#!/usr/bin/env python3
"""STAND-IN scheduler CLIs for PBS, LSF, HTCondor and Grid Engine, which cannot be installed here.

Not the real thing: called as qsub/qstat/qdel (PBS or SGE), bsub/bjobs/bkill, condor_submit/condor_q/
condor_rm, through links in a directory that also holds standin.json ({"dir": state directory, "flavour":
pbs|sge|lsf|htcondor}); the environment is not used for this, since satellite-client runs the CLIs with
a minimal one. Each records its arguments, the environment it was given and (condor_submit) the submit
description in <dir>/calls.jsonl, checks the directives it is given like the real CLI would (unknown flags
are refused), answers in the real CLI's output format, and runs the job script in the background so a
launch works end to end, with the environment the real one would give the job: bsub's own (LSF copies the
submission environment), qsub's (PBS/SGE: -V is never used, but the stand-in passes its own, the wider
case), and for HTCondor only the description's `environment` unless it says `getenv = true`.
"""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

SETUP = json.loads((Path(sys.argv[0]).parent / "standin.json").read_text())
STATE = Path(SETUP["dir"])
NAME = Path(sys.argv[0]).name
ARGS = sys.argv[1:]

KNOWN_FLAGS = {     # directive flags each real scheduler accepts (the subset the client may write)
    "pbs": {"-N", "-o", "-j", "-r", "-l", "-A", "-q"},
    "sge": {"-N", "-o", "-j", "-S", "-r", "-wd", "-l", "-pe", "-P", "-q", "-ar", "-notify"},
    "lsf": {"-J", "-o", "-W", "-n", "-R", "-M", "-P", "-q", "-U", "-gpu", "-wa", "-wt"},
}
PREFIX = {"pbs": "#PBS", "sge": "#$", "lsf": "#BSUB"}


def record(stdin=None, description=None):
    with open(STATE / "calls.jsonl", "a") as f:
        f.write(json.dumps({"cli": NAME, "args": ARGS, "stdin": stdin, "description": description,
                            "env": dict(os.environ)}) + "\n")


def fail(message, code=1):
    print(message, file=sys.stderr)
    sys.exit(code)


def directives(script, flavour):
    found = []
    for line in script.splitlines():
        if line.startswith(PREFIX[flavour] + " "):
            words = shlex.split(line[len(PREFIX[flavour]) + 1:])
            if words[0] not in KNOWN_FLAGS[flavour]:
                fail(f"{NAME}: invalid option -- '{words[0]}'", 2)
            found.append(words)
    return found


def start(jobid, script_path, output, env_name, environment=None):
    env = dict(os.environ if environment is None else environment, **{env_name: jobid})
    with open(output, "ab") as out:
        # the job's exit status is kept in <jobid>.exit, for qstat -f's Exit_status and bjobs' DONE/EXIT
        proc = subprocess.Popen(["bash", "-c", 'bash "$1"; echo $? > "$2"', "job", script_path,
                                 str(STATE / f"{jobid}.exit")], stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
    (STATE / f"{jobid}.pid").write_text(str(proc.pid))


def next_id():
    counter = STATE / "counter"
    value = int(counter.read_text()) + 1 if counter.exists() else 1001
    counter.write_text(str(value))
    return str(value)


def alive(jobid):
    pid_file = STATE / f"{jobid}.pid"
    if not pid_file.exists():
        return None
    pid = int(pid_file.read_text())
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


def exit_status(jobid):
    path = STATE / f"{jobid}.exit"
    return path.read_text().strip() if path.exists() else "0"


def cancel(jobid):
    pid_file = STATE / f"{jobid}.pid"
    if pid_file.exists():
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGTERM)
        except ProcessLookupError:
            pass


def condor_environment(description):
    """The job's environment as HTCondor builds it: the submitter's with getenv = true, else only the
    `environment` command's (the new syntax: "NAME=value NAME='value with spaces'")."""
    if description.get("getenv", "").lower() in ("true", "yes"):
        return dict(os.environ)
    quoted = description.get("environment", '""').strip()
    if not (quoted.startswith('"') and quoted.endswith('"')):
        fail("ERROR: environment must use the new syntax, in double quotes")
    return dict(word.split("=", 1) for word in shlex.split(quoted[1:-1]) if "=" in word)


def option(found, flag, default=None):
    return next((w[1] for w in found if w[0] == flag and len(w) > 1), default)


def main():
    flavour = SETUP["flavour"]
    if NAME == "qsub":
        record()
        script = Path(ARGS[-1]).read_text()
        found = directives(script, flavour)
        jobid = next_id()
        start(jobid, ARGS[-1], option(found, "-o", "/dev/null"), "PBS_JOBID" if flavour == "pbs" else "JOB_ID")
        name = option(found, "-N", "job")
        print(f"{jobid}.standin-server" if flavour == "pbs" else f'Your job {jobid} ("{name}") has been submitted')
    elif NAME == "qstat" and flavour == "pbs":
        record()
        jobid = ARGS[-1].split(".")[0]
        state = alive(jobid)
        if state is None:
            fail(f"qstat: Unknown Job Id {ARGS[-1]}", 153)
        print(f"Job Id: {ARGS[-1]}\n    job_state = {'R' if state else 'F'}\n"
              + ("" if state else f"    Exit_status = {exit_status(jobid)}\n"))
    elif NAME == "qstat":
        record()
        print("job-ID  prior   name       user         state submit/start at     queue   slots ja-task-ID")
        print("-" * 90)
        for pid_file in STATE.glob("*.pid"):
            if alive(pid_file.stem):
                print(f"{pid_file.stem:>7} 0.50000 satellite  user         r     11/24/2026 10:00:00 all.q@node 1")
    elif NAME in ("qdel", "bkill", "condor_rm"):
        record()
        cancel(ARGS[0].split(".")[0])
    elif NAME == "bsub":
        script = sys.stdin.read()
        record(stdin=script)
        found = directives(script, "lsf")
        path = STATE / f"bsub-{next_id()}.sh"
        path.write_text(script)
        jobid = path.stem.split("-")[1]
        start(jobid, str(path), option(found, "-o", "/dev/null"), "LSB_JOBID")
        print(f"Job <{jobid}> is submitted to default queue <normal>.")
    elif NAME == "bjobs":
        record()
        state = alive(ARGS[-1])
        if state is None:
            fail(f"Job <{ARGS[-1]}> is not found", 255)
        print("RUN" if state else "DONE" if exit_status(ARGS[-1]) == "0" else "EXIT")
    elif NAME == "condor_submit":
        text = Path(ARGS[-1]).read_text()
        record(description=text)
        description = dict(re.findall(r"^(\w+)\s*=\s*(.*)$", text, re.M))
        allowed = {"executable", "output", "error", "log", "batch_name", "getenv", "environment", "periodic_remove",
                   "request_memory", "request_cpus", "request_gpus", "accounting_group"}
        unknown = set(description) - allowed
        if unknown or "queue" not in text:
            fail(f"ERROR: unknown submit command(s) {sorted(unknown)} or no queue statement")
        jobid = next_id()
        start(jobid, description["executable"], description["output"], "CONDOR_JOBID", condor_environment(description))
        print(f"Submitting job(s).\n1 job(s) submitted to cluster {jobid}.")
    elif NAME == "condor_q":
        record()
        state = alive(ARGS[0])
        print("2" if state else "", end="\n" if state else "")
    else:
        fail(f"stand-in does not know {NAME}")


if __name__ == "__main__":
    main()
