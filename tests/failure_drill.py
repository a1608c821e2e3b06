#!/usr/bin/env python
"""Inject every fault of the failure table (docs/distributed.md) through the real
launchers on 2 CPU ranks and measure what happens.

    python tests/failure_drill.py                        # every fault (~15 minutes on 2 cores)
    python tests/failure_drill.py --faults raise,kill    # some of them
    python tests/failure_drill.py --list                 # names and what each does

Each fault runs `configs/debug.yaml` in its own folder (`--work`, default a temporary one)
with the launch commands of tests/test_failures.py; faults inside a rank come from
tests/faults/train_with_fault.py. Measured per fault: seconds from the fault to the end of
the last process of the job, the exit code of each launched command (a command killed by
signal N shows 128+N, as a shell does), the key message lines, and, after a rerun of the
same command, the step it resumed from and the largest difference between its losses and
those of one uninterrupted run. Prints one JSON line per fault, then a markdown table with
the columns of the table in docs/distributed.md. It lives beside the tests whose launch
helpers (tests/launching.py) and fault injection it uses; it measures, the tests assert.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import launching
from launching import DEEPSPEED, ROOT, launch_env, torchrun_node_env

from rskdist.comm import free_port
from rskdist.runlog import read_summary, train_losses

FAULTY = "tests/faults/train_with_fault.py"
STEPS = 30  # every run, interrupted or not, has this length: the LR schedule is the same
FAULT_STEP = 5
# The lines worth quoting: each rank's error, the stop messages, warnings, the launchers' view.
KEY_LINE = re.compile(r"^(error: |rskdist: stopped|warning: (rank|step)|checkpoint: )|bad images replaced|"
                      r"exits with return code|ssh exited|failed \(exitcode|SignalException")


def _train_args(out: Path, *extra: str) -> list[str]:
    return ["--config", "configs/debug.yaml", f"run.output_dir={out}", "eval.every_epochs=-1", "run.log_every=1",
            f"run.max_steps={STEPS}", *extra]


def deepspeed_cmd(script: str, out: Path, *args: str, extra=()) -> list[str]:
    """One node, two ranks: the command of tests/test_failures.py."""
    return launching.deepspeed_cmd(*args, *_train_args(out, *extra), script=script)


def no_ssh_cmds(out: Path, tmp: Path, extra=()) -> list[list[str]]:
    """Two `--no_ssh` nodes of one rank each on loopback (tests/test_integration.py)."""
    hostfile = tmp / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    port = str(free_port())
    return [[DEEPSPEED, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node), "--master_addr",
             "127.0.0.1", "--master_port", port, "rskdist/train.py", *_train_args(out, *extra)] for node in (0, 1)]


def torchrun_cmds(out: Path, nodes: int, extra=(), nproc: int | None = None, restarts: int = 0,
                  nnodes: str | None = None) -> list[tuple[list[str], dict]]:
    """launchers/torchrun.sh, on one node with 2 processes or on `nodes` loopback nodes of one
    (`nproc` processes per node instead: a job that lost a node), meeting through the c10d
    rendezvous; `restarts`: the elastic agent's MAX_RESTARTS (0: a failure ends the job);
    `nnodes`: NNODES as given (MIN:MAX), else `nodes`."""
    env = dict(torchrun_node_env(nnodes=nnodes or str(nodes), nproc=nproc or 2 // nodes, rdzv_id=f"drill-{out.name}"),
               MAX_RESTARTS=str(restarts), RDZV_LAST_CALL="5")
    return [(["bash", "launchers/torchrun.sh", *_train_args(out, *extra)[2:]], env) for _ in range(nodes)]


class Job:
    """Launched commands whose output is read line by line, with the time of each line."""

    def __init__(self, cmds: list, stagger_s: float = 0.0) -> None:
        """`stagger_s`: seconds between the starts of the commands (the first one serves the
        c10d rendezvous when every command could)."""
        self.lines: list[str] = []
        self.times: list[float] = []  # when each line was read
        self._queue: queue.Queue = queue.Queue()
        self.procs, self._readers = [], []
        self.started = time.time()
        for cmd in cmds:
            cmd, env = cmd if isinstance(cmd, tuple) else (cmd, {})
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    env=launch_env(**env))
            reader = threading.Thread(target=self._read, args=(proc,), daemon=True)
            reader.start()
            self.procs.append(proc)
            self._readers.append(reader)
            time.sleep(stagger_s if cmd is not cmds[-1] else 0)

    def _read(self, proc) -> None:
        for line in proc.stdout:  # EOF only once every process that inherited the pipe has exited
            self._queue.put((time.time(), line))
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float = 600) -> bool:
        """Read output until a line matches `pattern` (True) or every output ends (False)."""
        done, deadline = 0, time.time() + timeout
        while done < len(self.procs) and time.time() < deadline:
            try:
                item = self._queue.get(timeout=1)
            except queue.Empty:
                continue
            if item is None:
                done += 1
                continue
            self.times.append(item[0])
            line = item[1]
            self.lines.append(line)
            if re.search(pattern, line):
                return True
        return False

    def finish(self, timeout: float = 600) -> float:
        """Wait for every process and every output to end; returns that moment."""
        self.wait_for(r"(?!)", timeout)
        for reader in self._readers:
            reader.join(timeout=5)
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
        return time.time()

    @property
    def codes(self) -> list[int]:
        return [128 - code if code < 0 else code for code in (p.returncode for p in self.procs)]

    @property
    def log(self) -> str:
        return "".join(self.lines)


def rank_pids(out: Path, rank: int | None = None) -> list[int]:
    """The training processes of the run writing to `out` (rank `rank`, or all)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        # A rank runs `python [-u] SCRIPT ...`; the launchers name the script further on.
        if (any(arg.endswith((b"train.py", b"train_with_fault.py")) for arg in cmd[1:3])
                and f"run.output_dir={out}".encode() in cmd
                and (rank is None or f"RANK={rank}".encode() in environ)):
            pids.append(int(entry.name))
    return pids


def key_lines(log: str, limit: int = 3) -> list[str]:
    """The first distinct lines that say what happened (hosts and pids masked)."""
    found = []
    for line in log.splitlines():
        if not KEY_LINE.search(line):
            continue
        line = re.sub(r"^\[[^\]]*\] \[\w+\] \[[^\]]*\] ", "", line.strip())  # DeepSpeed's logger prefix
        line = re.sub(r"\(([\w.-]+)\): ", "(host): ", line)
        line = re.sub(r"(pid|Process|subprocess) \d+", r"\1 N", line)
        if line not in found:
            found.append(line if len(line) <= 160 else line[:157] + "...")
        if len(found) == limit:
            break
    return found


def latest(out: Path) -> str | None:
    pointer = out / "debug" / "checkpoints" / "latest"
    return pointer.read_text() if pointer.is_file() else None


def _deepspeed_layout(out: Path, extra=()) -> list:
    return [deepspeed_cmd("rskdist/train.py", out, extra=extra)]


@dataclass
class Drill:
    work: Path
    references: dict[str, dict[int, float]] = field(default_factory=dict)

    def uninterrupted(self, layout: str = "deepspeed", make_cmds: Callable = _deepspeed_layout) -> dict[int, float]:
        """Losses of the same run without faults, once per drill and launch layout: a layout
        with another number of processes per node (threads per rank) rounds differently."""
        if layout not in self.references:
            out = self.work / f"reference-{layout}"
            job = Job(make_cmds(out, ("run.save_every=100",)))
            job.finish()
            if any(job.codes):
                raise RuntimeError(f"the uninterrupted {layout} reference run failed:\n{job.log[-3000:]}")
            self.references[layout] = train_losses(out / "debug")
        return self.references[layout]

    def resume(self, out: Path, cmds: list, layout: str = "deepspeed", make_cmds: Callable = _deepspeed_layout,
               rerun_cmds: Callable | None = None) -> str:
        """Rerun the same command(s) (or `cmds`, on another world size): the step resumed from
        and the losses against an uninterrupted run of the same layout."""
        rerun = Job(cmds)
        rerun.finish()
        match = re.search(r"resumed from \S+ at step (\d+)", rerun.log)
        if rerun.codes != [0] * len(cmds) or not match:
            return f"rerun failed (exit {rerun.codes}): {' / '.join(key_lines(rerun.log))}"
        return self.compare(out, int(match.group(1)), rerun.log, layout, make_cmds, rerun_cmds)

    def compare(self, out: Path, step: int, log: str, layout: str, make_cmds: Callable,
                rerun_cmds: Callable | None) -> str:
        """The losses after `step` against an uninterrupted run of the same layout (and, after
        a resume on another world size, against how far uninterrupted runs on both drift)."""
        got, want = train_losses(out / "debug"), self.uninterrupted(layout, make_cmds)
        diff = max(abs(got[s] - want[s]) for s in range(step + 1, STEPS + 1))
        change = re.search(r"world size (\d+) -> (\d+)", log)  # a resume on another world size says so
        if not change:
            verdict = "losses equal an uninterrupted run" if diff <= 1e-6 else "losses DIFFER from an uninterrupted run"
            return f"from step {step}; {verdict} (max diff {diff:.1e})"
        # Other ranks add the same numbers in another order: held against how far two
        # uninterrupted runs on the two world sizes drift apart over the same steps.
        other = self.uninterrupted(f"{layout}-on-{change.group(2)}", rerun_cmds)
        spread = max(abs(other[s] - want[s]) for s in range(step + 1, STEPS + 1))
        first = abs(got[step + 1] - want[step + 1])
        return (f"from step {step} on {change.group(2)} rank(s) instead of {change.group(1)}; max diff {diff:.1e} "
                f"(first resumed step {first:.1e}); uninterrupted runs on {change.group(1)} and {change.group(2)} "
                f"rank(s) differ by {spread:.1e} over the same steps (reduction order)")


def _inject(job: Job, out: Path, sig: signal.Signals, rank: int | None, launcher: bool = False) -> float:
    """At the progress line of FAULT_STEP send `sig` to rank `rank` (None: every rank), or to
    the first launched command alone; returns the moment."""
    if not job.wait_for(rf"^step +{FAULT_STEP}/"):
        raise RuntimeError(f"the run ended before step {FAULT_STEP}:\n{job.log[-3000:]}")
    t_fault = time.time()
    targets = [job.procs[0].pid] if launcher else rank_pids(out, rank)
    for pid in targets:
        os.kill(pid, sig)
    return t_fault


def _time_of_line(job: Job, pattern: str) -> float:
    """When the first line matching `pattern` was read: the moment of a fault injected inside
    a rank, which says so itself (the launch moment if no line matches)."""
    for when, line in zip(job.times, job.lines):
        if re.search(pattern, line):
            return when
    return job.started


def kill_fault(make_cmds: Callable[[Path], list], sig=signal.SIGKILL, rank: int | None = 1, launcher=False,
               save_every: int = 2, layout: str = "deepspeed",
               rerun_cmds: Callable[[Path], list] | None = None) -> Callable[[Drill, Path], dict]:
    """`rerun_cmds`: the commands of the rerun when they are not the job's own (fewer ranks
    after a lost node); its losses are still held against the uninterrupted job's."""
    def run(drill: Drill, out: Path) -> dict:
        drill.uninterrupted(layout, make_cmds)
        cmds = make_cmds(out, (f"run.save_every={save_every}",))
        job = Job(cmds)
        t_fault = _inject(job, out, sig, rank, launcher)
        ended = job.finish() - t_fault
        again = (rerun_cmds or make_cmds)(out, (f"run.save_every={save_every}",))
        return dict(ended_s=round(ended, 1), exit_codes=job.codes, messages=key_lines(job.log),
                    latest=latest(out), resume=drill.resume(out, again, layout, make_cmds, rerun_cmds))
    return run


def faulty_run(fault: str, step: int, *extra: str, rerun: bool = False) -> Callable[[Drill, Path], dict]:
    """A fault from tests/faults/train_with_fault.py on rank 1 at `step`."""
    def run(drill: Drill, out: Path) -> dict:
        if rerun:
            drill.uninterrupted()
        job = Job([deepspeed_cmd(FAULTY, out, fault, "1", str(step), extra=extra)])
        t_end = job.finish()
        marker = {"raise": r"error: rank 1", "killsave": r"Killing subprocess|exits with return code"}.get(fault)
        result = dict(ended_s=round(t_end - _time_of_line(job, marker), 1) if marker else None,
                      exit_codes=job.codes, messages=key_lines(job.log), latest=latest(out))
        if rerun:
            result["resume"] = drill.resume(out, [deepspeed_cmd("rskdist/train.py", out, extra=extra)])
        return result
    return run


def elastic_fault(lose_node: bool) -> Callable[[Drill, Path], dict]:
    """Two torchrun nodes under the elastic agent (MAX_RESTARTS=3), the fault from
    tests/faults/train_with_fault.py before step FAULT_STEP, in the first attempt only.
    `lose_node` False: rank 1 SIGKILLs itself and the agents restart the group; True: node 1's
    rank SIGKILLs its agent and itself (the node is gone for good) and node 0 goes on alone
    (NNODES=1:2). Measured: seconds from the agent's failure line to the first training step
    after the resume, the steps redone, the losses."""
    layout = "torchrun-2nodes"

    def make(out: Path, extra) -> list:
        return torchrun_cmds(out, 2, extra)

    def run(drill: Drill, out: Path) -> dict:
        drill.uninterrupted(layout, make)
        cmds = torchrun_cmds(out, 2, ("run.save_every=2",), restarts=3, nnodes="1:2" if lose_node else None)
        fault = dict(SCRIPT=FAULTY, RSKDIST_TEST_FAULT=f"killnode any {FAULT_STEP}" if lose_node
                     else f"kill 1 {FAULT_STEP}")
        faulty = [1] if lose_node else [0, 1]  # node 1's command alone, or both (the fault picks rank 1)
        cmds = [(cmd, {**env, **fault}) if n in faulty else (cmd, env) for n, (cmd, env) in enumerate(cmds)]
        job = Job(cmds, stagger_s=2.0)  # node 0 serves the rendezvous: node 1 may go
        job.finish(timeout=900)
        match = re.search(r"resumed from \S+ at step (\d+)", job.log)
        if not match:
            return dict(ended_s=None, exit_codes=job.codes, messages=key_lines(job.log), latest=latest(out),
                        resume=f"no resume: {' / '.join(key_lines(job.log))}")
        step, t_fault = int(match.group(1)), _time_of_line(job, r"failed \(exitcode")
        after = [when for when, line in zip(job.times, job.lines)
                 if when > t_fault and re.match(rf"^step +{step + 1}/", line)]
        recovered = f"{after[0] - t_fault:.1f} s" if after else "?"
        rerun = (lambda o, extra: torchrun_cmds(o, 1, extra, nproc=1)) if lose_node else None
        verdict = drill.compare(out, step, job.log, layout, make, rerun)
        return dict(ended_s=None, exit_codes=job.codes, messages=key_lines(job.log), latest=latest(out),
                    resume=f"inside the job: training again {recovered} after the agent saw the failure, "
                           f"{FAULT_STEP - step} step(s) redone; {verdict}")
    return run


def full_disk(drill: Drill, out: Path) -> dict:
    """A 3 MB tmpfs as the run folder: one checkpoint of configs/debug.yaml fits, two do not."""
    out.mkdir(parents=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(out)], capture_output=True,
                           text=True)
    if mount.returncode != 0:
        return dict(skipped=f"cannot mount a tmpfs here (needs root): {mount.stderr.strip()}")
    try:
        job = Job([deepspeed_cmd("rskdist/train.py", out, extra=("run.save_every=2", "run.loggers=[]"))])
        t_end = job.finish()
        return dict(ended_s=round(t_end - _time_of_line(job, r"checkpoint: cannot write"), 1),
                    exit_codes=job.codes, messages=key_lines(job.log), latest=latest(out))
    finally:
        subprocess.run(["umount", "-l", str(out)], capture_output=True)


def bad_images(drill: Drill, out: Path) -> dict:
    """2 corrupt training images and 1 corrupt test image inside the shards (tests/test_failures.py)."""
    from test_bad_bytes import corrupt_copy
    from test_data_stream import make_shards

    from rskdist.data import shards as S

    clean = make_shards(out / "clean", [8] * 8, samples_per_shard=10, image_size=32, test_counts=(4, 3, 5))
    root = corrupt_copy(clean, out / "bad", "train", [0, 7])
    row = S.load_split(root, "test").samples[2]
    with open(S.load_split(root, "test").shard_paths[row["shard"]], "r+b") as f:
        f.seek(int(row["offset"]))
        f.write(b"\0" * int(row["size"]))
    job = Job([[sys.executable, "rskdist/train.py", "--config", "configs/debug.yaml", f"run.output_dir={out}",
                "data.source=shards", f"data.root={root}", "data.num_workers=0", "data.global_batch=32",
                "run.max_steps=0", "run.epochs=1", "eval.every_epochs=0", "model.pretrained="]])
    job.finish()
    summary = (read_summary(out / "debug") or {}) if job.codes == [0] else {}
    final = summary.get("final_eval") or {}
    return dict(ended_s=None, exit_codes=job.codes, messages=key_lines(job.log, limit=2),
                images_skipped=f"{summary.get('bad_samples')} training images replaced, "
                               f"{final.get('num_unreadable_images', 0)} test image left out")


# name: (what is injected, how)
FAULTS: dict[str, tuple[str, Callable[[Drill, Path], dict]]] = {
    "raise": ("`RuntimeError` on rank 1 before step 2", faulty_run("raise", 2)),
    "kill": (f"SIGKILL of rank 1 at step {FAULT_STEP}, one node (`deepspeed --num_gpus 2`)",
             kill_fault(lambda out, extra: [deepspeed_cmd("rskdist/train.py", out, extra=extra)])),
    "kill_no_ssh": (f"SIGKILL of rank 1 at step {FAULT_STEP}, two `--no_ssh` nodes on loopback",
                    kill_fault(lambda out, extra: no_ssh_cmds(out, out.parent, extra), layout="no-ssh-2nodes")),
    "kill_torchrun": (f"SIGKILL of rank 1 at step {FAULT_STEP}, `launchers/torchrun.sh` (one node, 2 processes)",
                      kill_fault(lambda out, extra: torchrun_cmds(out, 1, extra))),
    "kill_torchrun_2nodes": (f"SIGKILL of rank 1 at step {FAULT_STEP}, two torchrun nodes (`--nnodes 2`) on "
                             f"loopback", kill_fault(lambda out, extra: torchrun_cmds(out, 2, extra), layout="torchrun-2nodes")),
    "lost_node": (f"node 1 of two torchrun nodes lost for good at step {FAULT_STEP} (SIGKILL of its rank); the "
                  f"rerun has node 0 alone (1 rank instead of 2)",
                  kill_fault(lambda out, extra: torchrun_cmds(out, 2, extra), layout="torchrun-2nodes",
                             rerun_cmds=lambda out, extra: torchrun_cmds(out, 1, extra, nproc=1))),
    "restart_torchrun": (f"SIGKILL of rank 1 at step {FAULT_STEP}, two torchrun nodes under the elastic agent "
                         f"(`MAX_RESTARTS=3`)", elastic_fault(lose_node=False)),
    "agent_lost": (f"node 1 of two torchrun nodes (agent and rank) killed for good at step {FAULT_STEP}, "
                   f"`NNODES=1:2` under the elastic agent", elastic_fault(lose_node=True)),
    "sigterm_ranks": (f"SIGTERM to every rank at step {FAULT_STEP} (what SLURM does)",
                      kill_fault(lambda out, extra: [deepspeed_cmd("rskdist/train.py", out, extra=extra)],
                                 sig=signal.SIGTERM, rank=None, save_every=100)),
    "sigterm_launcher": (f"SIGTERM to the `deepspeed` command alone at step {FAULT_STEP}",
                         kill_fault(lambda out, extra: [deepspeed_cmd("rskdist/train.py", out, extra=extra)],
                                    sig=signal.SIGTERM, launcher=True, save_every=100)),
    "sigterm_torchrun": (f"SIGTERM to `launchers/torchrun.sh` alone at step {FAULT_STEP}",
                         kill_fault(lambda out, extra: torchrun_cmds(out, 1, extra), sig=signal.SIGTERM,
                                    launcher=True, save_every=100)),
    "nan_skip": ("NaN embeddings on rank 1 at step 3, `run.nonfinite=skip`", faulty_run("nan", 3)),
    "nan_stop": ("the same, `run.nonfinite=stop`", faulty_run("nan", 3, "run.nonfinite=stop")),
    "killsave": ("rank 1 SIGKILLed right after writing its part of the step-4 save",
                 faulty_run("killsave", 4, "run.save_every=2", rerun=True)),
    "full_disk": ("a full disk (3 MB tmpfs) at the step-4 save", full_disk),
    "bad_images": ("2 corrupt training images, 1 corrupt test image (shards)", bad_images),
}


def markdown(rows: list[dict]) -> str:
    lines = ["| fault | job ended | exit code | message | resume |", "|---|---|---|---|---|"]
    for row in rows:
        if "skipped" in row or "error" in row:
            lines.append(f"| {row['what']} | - | - | {row.get('skipped') or row['error']} | - |")
            continue
        ended = "completes" if row["ended_s"] is None else f"{row['ended_s']} s after the fault"
        message = "<br>".join(f"`{m.replace('|', '/')}`" for m in row["messages"]) or "-"
        resume = row.get("resume") or row.get("images_skipped") or (
            f"`latest` = {row['latest']}" if row.get("latest") else "no checkpoint written")
        lines.append(f"| {row['what']} | {ended} | {' / '.join(map(str, row['exit_codes']))} | {message} | "
                     f"{resume} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faults", default=",".join(FAULTS), help="comma-separated names (default: all)")
    parser.add_argument("--list", action="store_true", help="print the faults and exit")
    parser.add_argument("--work", help="folder for the runs (default: a new temporary folder)")
    args = parser.parse_args(argv)
    if args.list:
        for name, (what, _) in FAULTS.items():
            print(f"{name:22s} {what}")
        return 0
    names = [n for n in args.faults.split(",") if n]
    unknown = [n for n in names if n not in FAULTS]
    if unknown:
        parser.error(f"unknown fault(s) {', '.join(unknown)}; choose from {', '.join(FAULTS)} (or see --list)")
    drill = Drill(Path(args.work or tempfile.mkdtemp(prefix="rskdist-drill-")).resolve())
    rows = []
    for name in names:
        what, run = FAULTS[name]
        print(f"== {name}: {what}", file=sys.stderr, flush=True)
        try:
            row = {"fault": name, "what": what, **run(drill, drill.work / name)}
        except Exception as exc:  # noqa: BLE001 - one failed drill should not hide the others' rows
            row = {"fault": name, "what": what, "error": f"{type(exc).__name__}: {str(exc)[-300:]}"}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(markdown(rows))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
