"""Stand-ins for `sbatch`, `srun`, `scontrol` and `hostname` that run a SLURM job on this machine.

A fake allocation of N nodes (`node1` ... `nodeN`) is N groups of local processes. Every process
of a node carries the environment a real allocation gives it (`SLURM_JOB_ID`, `SLURM_NODEID`,
`SLURMD_NODENAME`, ...), so a node is "killed" by killing the processes whose environment names
it (`kill_node`), whatever sessions they started. Only the options that
`scripts/multinode_trainer.slurm` needs are understood; any other stops with an error naming it,
so a script change the stand-ins cannot honour fails the test instead of passing unchecked.

`sbatch` runs the job to completion before returning, like `sbatch --wait`, and prints
`Submitted batch job <id>` (flushed) first. Try it by hand from the repository root:
    PATH=tests/e2e/slurm_stubs:$PATH GPUS_PER_NODE=1 CONFIG_FILE=train_configs/debug_mot.toml \
        sbatch --nodes=2 scripts/multinode_trainer.slurm --training.steps 5
"""

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

# Resource requests a fake node cannot honour; accepted so the real script's directives parse.
_SBATCH_RESOURCE_OPTIONS = {"--ntasks-per-node", "--gpus-per-node", "--cpus-per-task", "--exclusive",
                            "--partition", "-p", "--time", "-t"}
_SBATCH_FLAGS = {"--exclusive"}  # options without a value
_KILL_WAIT_S = 5.0  # SIGTERM -> SIGKILL grace, SLURM's KillWait (30 s by default) made short


class FakeSlurmError(RuntimeError):
    """A request the stand-ins do not implement or that SLURM itself would refuse."""


def _parse_options(argv: list[str], known: dict[str, str], flags: set[str],
                   command: str) -> tuple[dict[str, str], list[str]]:
    """`--opt=v`, `--opt v`, `-o v` options up to the first non-option argument.

    `known` maps every accepted spelling to its canonical long name; flags take no value.
    Returns ({canonical name: value}, remaining arguments).
    """
    options: dict[str, str] = {}
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        name, eq, value = argv[i].partition("=")
        if name not in known:
            raise FakeSlurmError(f"{command}: option {name} is not implemented by the stand-in")
        if name in flags:
            value = "1"
        elif not eq:
            i += 1
            if i == len(argv):
                raise FakeSlurmError(f"{command}: option {name} needs a value")
            value = argv[i]
        options[known[name]] = value
        i += 1
    return options, argv[i:]


def expand_hostlist(hostlist: str) -> list[str]:
    """`node[1-3,07],login` -> node1 node2 node3 node07 login (zero padding kept)."""
    hosts: list[str] = []
    for prefix, ranges, suffix, plain in re.findall(r"([^,\[]*)\[([^\]]*)\]([^,]*)|([^,\[\]]+)",
                                                    hostlist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            low, _, high = part.partition("-")
            for n in range(int(low), int(high or low) + 1):
                hosts.append(f"{prefix}{n:0{len(low)}d}{suffix}")
    if not hosts:
        raise FakeSlurmError(f"scontrol: cannot expand host list {hostlist!r}")
    return hosts


def _expand_pattern(pattern: str, fields: dict[str, str], command: str) -> str:
    """SLURM's filename patterns (`%j`, `%x`, `%N`, ...), each from `fields`; `%%` is `%`."""

    def one(match: re.Match) -> str:
        key = match.group(1)
        if key == "%":
            return "%"
        if key not in fields:
            raise FakeSlurmError(f"{command}: filename pattern %{key} is not implemented by the stand-in")
        return fields[key]

    return re.sub(r"%(.)", one, pattern)


def sbatch(argv: list[str]) -> int:
    """Run a batch script as job `<pid>` on `--nodes` fake nodes; return its exit status."""
    known = {"--nodes": "--nodes", "-N": "--nodes", "--job-name": "--job-name", "-J": "--job-name",
             "--output": "--output", "-o": "--output"}
    known.update({o: o for o in _SBATCH_RESOURCE_OPTIONS})
    options, rest = _parse_options(argv, known, _SBATCH_FLAGS, "sbatch")
    if not rest:
        raise FakeSlurmError("sbatch: no batch script given")
    script, script_args = Path(rest[0]), rest[1:]
    lines = script.read_text().splitlines()
    if not lines or not lines[0].startswith("#!"):
        raise FakeSlurmError(f"sbatch: {script} does not start with #! (SLURM requires it)")
    # SLURM reads #SBATCH lines up to the first command; the command line wins over them.
    directives: list[str] = []
    for line in lines[1:]:
        if line.strip() and not line.startswith("#"):
            break
        if line.startswith("#SBATCH "):
            directives += shlex.split(line[len("#SBATCH "):])
    from_script, _ = _parse_options(directives, known, _SBATCH_FLAGS, f"sbatch ({script} #SBATCH)")
    options = {**from_script, **options}

    job_id = str(os.getpid())
    num_nodes = int(options.get("--nodes", "1"))
    nodelist = f"node[1-{num_nodes}]" if num_nodes > 1 else "node1"
    job_name = options.get("--job-name", script.name)
    output = Path(_expand_pattern(options.get("--output", "slurm-%j.out"),
                                  {"j": job_id, "x": job_name, "N": "node1"}, "sbatch"))
    if not output.parent.is_dir():
        # Real SLURM starts the job anyway and its output is lost; refuse loudly instead.
        raise FakeSlurmError(f"sbatch: job output {output}: directory {output.parent} does not "
                             "exist (SLURM does not create it)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SLURMD_", "SRUN_"))}
    env.update({
        "SLURM_JOB_ID": job_id, "SLURM_JOBID": job_id, "SLURM_JOB_NAME": job_name,
        "SLURM_JOB_NODELIST": nodelist, "SLURM_NODELIST": nodelist,
        "SLURM_JOB_NUM_NODES": str(num_nodes), "SLURM_NNODES": str(num_nodes),
        "SLURM_NODEID": "0", "SLURMD_NODENAME": "node1", "SLURM_SUBMIT_DIR": os.getcwd(),
    })
    if "--cpus-per-task" in options:
        env["SLURM_CPUS_PER_TASK"] = options["--cpus-per-task"]
    print(f"Submitted batch job {job_id}", flush=True)
    interpreter = shlex.split(lines[0][2:])
    with open(output, "w") as out:
        return subprocess.run([*interpreter, str(script), *script_args], env=env,
                              stdout=out, stderr=subprocess.STDOUT).returncode


def _processes_with_env(match: dict[str, str], keys: tuple[str, ...] = ()) -> list[int]:
    """Pids of this user's processes whose environment holds every `match` item and `keys`."""
    wanted = {f"{k}={v}".encode() for k, v in match.items()}
    prefixes = tuple(f"{k}=".encode() for k in keys)
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            entries = environ.read_bytes().split(b"\0")
        except OSError:
            continue
        if wanted <= set(entries) and all(any(e.startswith(p) for e in entries) for p in prefixes):
            pids.append(int(environ.parent.name))
    return pids


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def kill_node(job_id: str, node_id: int) -> list[int]:
    """A node failure: SIGKILL every job-step process of node `node_id`; return their pids."""
    pids = _processes_with_env({"SLURM_JOB_ID": job_id, "SLURM_NODEID": str(node_id)},
                               ("SLURM_STEP_ID",))
    _signal_all(pids, signal.SIGKILL)
    return pids


def _kill_task(step_env: dict[str, str], task: int) -> None:
    """End one task the way slurmstepd does: SIGTERM to all its processes, SIGKILL after KillWait."""
    match = {"SLURM_JOB_ID": step_env["SLURM_JOB_ID"], "SLURM_STEP_ID": step_env["SLURM_STEP_ID"],
             "SLURM_PROCID": str(task)}
    _signal_all(_processes_with_env(match), signal.SIGTERM)
    deadline = time.monotonic() + _KILL_WAIT_S
    while time.monotonic() < deadline and _processes_with_env(match):
        time.sleep(0.1)
    _signal_all(_processes_with_env(match), signal.SIGKILL)


def srun(argv: list[str]) -> int:
    """Run one job step: the command once per task, each task on its fake node.

    Returns the largest task exit status (128 + signal for a killed task), as srun does.
    """
    if "SLURM_JOB_ID" not in os.environ:
        raise FakeSlurmError("srun: not inside a job (no SLURM_JOB_ID); submit with sbatch")
    names = {"--nodes": "--nodes", "-N": "--nodes", "--ntasks": "--ntasks", "-n": "--ntasks",
             "--ntasks-per-node": "--ntasks-per-node", "--nodelist": "--nodelist", "-w": "--nodelist",
             "--output": "--output", "-o": "--output", "--error": "--error", "-e": "--error",
             "--kill-on-bad-exit": "--kill-on-bad-exit", "--cpus-per-task": "--cpus-per-task",
             "-c": "--cpus-per-task"}
    options, command = _parse_options(argv, names, set(), "srun")
    if "SRUN_CPUS_PER_TASK" in os.environ:  # srun's documented environment input for -c
        options.setdefault("--cpus-per-task", os.environ["SRUN_CPUS_PER_TASK"])
    if not command:
        raise FakeSlurmError("srun: no command given")
    job_nodes = expand_hostlist(os.environ["SLURM_JOB_NODELIST"])
    nodes = expand_hostlist(options["--nodelist"]) if "--nodelist" in options else job_nodes
    if any(n not in job_nodes for n in nodes):
        raise FakeSlurmError(f"srun: --nodelist {options['--nodelist']} is not in the allocation {job_nodes}")
    nodes = nodes[: int(options.get("--nodes", len(nodes)))]
    per_node = int(options.get("--ntasks-per-node", "1"))
    num_tasks = int(options.get("--ntasks", len(nodes) * per_node))
    if num_tasks != len(nodes) * per_node:
        raise FakeSlurmError(f"srun: {num_tasks} tasks on {len(nodes)} nodes x {per_node} per node "
                             "is not implemented by the stand-in")
    step_id = str(os.getpid())
    step = {"SLURM_STEP_ID": step_id, "SLURM_STEPID": step_id,
            "SLURM_STEP_NODELIST": ",".join(nodes), "SLURM_STEP_NUM_NODES": str(len(nodes)),
            "SLURM_STEP_NUM_TASKS": str(num_tasks), "SLURM_NTASKS": str(num_tasks),
            "SLURM_NPROCS": str(num_tasks)}
    if "--cpus-per-task" in options:
        step["SLURM_CPUS_PER_TASK"] = options["--cpus-per-task"]
    files: dict[str, IO[str]] = {}
    tasks: list[tuple[str, subprocess.Popen]] = []
    for task in range(num_tasks):
        node = nodes[task // per_node]
        env = {**os.environ, **step, "SLURM_PROCID": str(task), "SLURM_LOCALID": str(task % per_node),
               "SLURM_NODEID": str(job_nodes.index(node)), "SLURMD_NODENAME": node}
        fields = {"j": os.environ["SLURM_JOB_ID"], "x": os.environ["SLURM_JOB_NAME"], "s": step_id,
                  "N": node, "n": str(nodes.index(node)), "t": str(task)}
        streams = []
        for option in ("--output", "--error"):
            pattern = options.get(option, options.get("--output"))
            if pattern is None:
                streams.append(None)  # inherited: the job output, or the caller's pipe
                continue
            path = _expand_pattern(pattern, fields, "srun")
            if path not in files:
                files[path] = open(path, "w")
            streams.append(files[path])
        tasks.append((node, subprocess.Popen(command, env=env, stdout=streams[0], stderr=streams[1])))

    kill_on_bad_exit = options.get("--kill-on-bad-exit", "0") == "1"
    status: dict[int, int] = {}
    while len(status) < len(tasks):
        for task, (node, proc) in enumerate(tasks):
            code = proc.poll()
            if task in status or code is None:
                continue
            status[task] = 128 - code if code < 0 else code
            if code:
                what = f"Killed by signal {-code}" if code < 0 else f"Exited with exit code {code}"
                print(f"srun: error: {node}: task {task}: {what}", file=sys.stderr, flush=True)
                if kill_on_bad_exit:
                    for other in range(len(tasks)):
                        if other not in status:
                            _kill_task(step, other)
        time.sleep(0.1)
    for f in files.values():
        f.close()
    return max(status.values())


def scontrol(argv: list[str]) -> int:
    """`scontrol show hostnames [LIST]`: one host per line (LIST defaults to the job's)."""
    if argv[:2] not in (["show", "hostnames"], ["show", "hostname"]) or len(argv) > 3:
        raise FakeSlurmError(f"scontrol: {' '.join(argv)} is not implemented by the stand-in")
    hostlist = argv[2] if len(argv) == 3 else os.environ.get("SLURM_JOB_NODELIST", "")
    print("\n".join(expand_hostlist(hostlist)))
    return 0


def hostname(argv: list[str]) -> int:
    """The fake node's name; every fake node's address is the loopback address."""
    if argv in ([], ["-s"], ["--short"]):
        print(os.environ.get("SLURMD_NODENAME", socket.gethostname()))
    elif argv in (["-i"], ["--ip-address"], ["-I"], ["--all-ip-addresses"]):
        print("127.0.0.1")
    else:
        raise FakeSlurmError(f"hostname: {' '.join(argv)} is not implemented by the stand-in")
    return 0


COMMANDS = {"sbatch": sbatch, "srun": srun, "scontrol": scontrol, "hostname": hostname}


def main() -> int:
    """Entry point of the stand-in executables: the command is the name it was called by."""
    command = Path(sys.argv[0]).name
    try:
        return COMMANDS[command](sys.argv[1:])
    except FakeSlurmError as e:
        print(e, file=sys.stderr)
        return 1
