"""What goes wrong on real jobs, injected through the real launcher on 2 CPU ranks: an
exception on one rank, a NaN on one rank, SIGTERM (preemption) and SIGKILL (a lost node).
The faults come from tests/faults/train_with_fault.py, which patches the trainer from
outside the package."""

import signal
import subprocess
import sys
import time

import pytest

from launching import ROOT, deepspeed_cmd, launch_env, records, run_cmd, train_losses

from rskdist.runlog import read_summary

pytestmark = pytest.mark.integration

FAULTY = "tests/faults/train_with_fault.py"


def _cmd(script, out_dir, *args):
    return deepspeed_cmd(*args, "--config", "configs/debug.yaml", f"run.output_dir={out_dir}", "eval.every_epochs=-1",
                         "run.log_every=1", script=script)


def _run(cmd, timeout=300):
    return run_cmd(cmd, timeout=timeout, check=False)


def test_exception_on_one_rank_ends_the_job_and_every_rank_says_why(tmp_path):
    proc = _run(_cmd(FAULTY, tmp_path, "raise", "1", "2"))  # would hang to the timeout if ranks waited
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "error: rank 1 (" in out and "RuntimeError: injected failure at step 2" in out
    assert "error: rank 0 (" in out and "lost the connection to another rank" in out


def test_nan_on_one_rank_is_skipped_on_every_rank_or_stops_the_run(tmp_path):
    proc = _run(_cmd(FAULTY, tmp_path / "skip", "nan", "1", "2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = records(tmp_path / "skip" / "debug")
    warnings = [r for r in written if r["kind"] == "warning"]
    assert [(w["step"], w["stage"], w["ranks"]) for w in warnings] == [(3, "embeddings", [1])]
    losses = train_losses(tmp_path / "skip" / "debug")
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and losses[3] != losses[3]  # the skipped step logs NaN
    assert all(0 < losses[s] < 1 for s in (4, 5, 6))  # training went on with finite losses
    report = _run([sys.executable, "tools/report.py", str(tmp_path / "skip" / "debug")])  # reads past warnings
    assert report.returncode == 0, report.stderr[-2000:]
    assert (tmp_path / "skip" / "debug" / "report.md").is_file()

    proc = _run(_cmd(FAULTY, tmp_path / "stop", "nan", "1", "2") + ["run.nonfinite=stop"])
    assert proc.returncode == 2
    assert "non-finite embeddings (first seen on rank 1); stopped without saving" in proc.stderr
    assert not (tmp_path / "stop" / "debug" / "checkpoints").exists()


def _signal_mid_run(cmd, pattern: str, sig, after_step: int = 4):
    """Start `cmd`, wait for the progress line of `after_step`, send `sig` to the processes
    matching `pattern`; returns (returncode, output)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=launch_env())
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step ") and int(line.split("/")[0].split()[-1]) >= after_step:
            subprocess.run(["pkill", f"-{sig.name[3:]}", "-f", pattern])
            break
    try:
        rest, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, "".join(lines) + rest


def test_sigterm_saves_the_last_step_and_the_rerun_continues_exactly(tmp_path):
    full = _run(_cmd("rskdist/train.py", tmp_path / "full") + ["run.max_steps=14"])
    assert full.returncode == 0, full.stderr[-3000:]
    out = tmp_path / "cut"
    cmd = _cmd("rskdist/train.py", out) + ["run.max_steps=14"]
    # What SLURM does at preemption: SIGTERM to every rank (here: this run's ranks only).
    code, log = _signal_mid_run(cmd, f"local_rank=.*run.output_dir={out}", signal.SIGTERM)
    assert code == 143, log[-3000:]
    stopped = int(log.split("stopped by SIGTERM after step ")[1].split(";")[0])
    assert (out / "debug" / "checkpoints" / "latest").read_text() == f"step{stopped:08d}"
    rerun = _run(cmd)
    assert rerun.returncode == 0 and f"at step {stopped}" in rerun.stdout
    resumed, expected = train_losses(out / "debug"), train_losses(tmp_path / "full" / "debug")
    assert sorted(resumed) == list(range(1, 15))
    for step in range(stopped + 1, 15):
        assert resumed[step] == pytest.approx(expected[step], abs=1e-6), step


def test_sigterm_to_the_launcher_alone_reaches_the_ranks(tmp_path):
    """A scheduler (or `kill PID`) that signals only the `deepspeed` command: DeepSpeed's
    single-node runner dies without passing it on; the ranks see their launcher gone, finish
    the step, save it and exit 143, and the rerun resumes from that step."""
    out = tmp_path / "run"
    cmd = _cmd("rskdist/train.py", out) + ["run.max_steps=400", "run.save_every=100"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=launch_env())
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step ") and int(line.split("/")[0].split()[-1]) >= 4:
            proc.send_signal(signal.SIGTERM)  # the launcher process only, not its group
            break
    assert proc.wait(timeout=30) == -signal.SIGTERM  # the runner dies at once, the ranks live on
    t0 = time.time()
    log = "".join(lines) + proc.stdout.read()  # EOF: every rank (and the per-node launcher) has exited
    assert time.time() - t0 < 120, log[-3000:]
    assert "its launcher (pid" in log and "is gone; stopping as on SIGTERM" in log, log[-3000:]
    stopped = int(log.split("stopped by SIGTERM after step ")[1].split(";")[0])
    assert 4 <= stopped < 400
    assert (out / "debug" / "checkpoints" / "latest").read_text() == f"step{stopped:08d}"
    rerun = _run(_cmd("rskdist/train.py", out) + [f"run.max_steps={stopped + 2}"])
    assert rerun.returncode == 0 and f"at step {stopped}" in rerun.stdout, rerun.stderr[-3000:]
    assert sorted(train_losses(out / "debug"))[-1] == stopped + 2


def test_a_kill_during_a_save_never_resumes_from_the_half_written_tag(tmp_path):
    full = _run(_cmd("rskdist/train.py", tmp_path / "full") + ["run.max_steps=8"])
    assert full.returncode == 0, full.stderr[-3000:]
    out = tmp_path / "cut"
    proc = _run(_cmd(FAULTY, out, "killsave", "1", "4") + ["run.max_steps=8", "run.save_every=2"])
    assert proc.returncode != 0
    ckpts = out / "debug" / "checkpoints"
    assert (ckpts / "step00000004").is_dir() and (ckpts / "latest").read_text() == "step00000002"
    rerun = _run(_cmd("rskdist/train.py", out) + ["run.max_steps=8", "run.save_every=2"])
    assert rerun.returncode == 0 and "at step 2" in rerun.stdout, rerun.stderr[-3000:]
    resumed, expected = train_losses(out / "debug"), train_losses(tmp_path / "full" / "debug")
    for step in range(3, 9):
        assert resumed[step] == pytest.approx(expected[step], abs=1e-6), step


@pytest.mark.slow
def test_a_killed_rank_ends_the_job_and_the_rerun_resumes(tmp_path):
    out = tmp_path / "run"
    cmd = _cmd("rskdist/train.py", out) + ["run.max_steps=400", "run.save_every=2"]
    t0 = time.time()
    code, log = _signal_mid_run(cmd, f"local_rank=1 .*run.output_dir={out}", signal.SIGKILL, after_step=5)
    assert code != 0 and time.time() - t0 < 240
    latest = (out / "debug" / "checkpoints" / "latest").read_text()
    rerun = _run(_cmd("rskdist/train.py", out) + ["run.max_steps=12", "run.save_every=2"])
    assert rerun.returncode == 0 and f"at step {int(latest[4:])}" in rerun.stdout


def test_unreadable_images_are_counted_in_the_logs_and_the_summary(tmp_path):
    from test_bad_bytes import corrupt_copy
    from test_data_stream import make_shards

    from rskdist.data import shards as S

    clean = make_shards(tmp_path / "clean", [8] * 8, samples_per_shard=10, image_size=32, test_counts=(4, 3, 5))
    root = corrupt_copy(clean, tmp_path / "bad", "train", [0, 7])
    test = S.load_split(root, "test")
    row = test.samples[2]
    with open(test.shard_paths[row["shard"]], "r+b") as f:  # one unreadable test image too
        f.seek(int(row["offset"]))
        f.write(b"\0" * int(row["size"]))
    # 8 classes x 8 images, m=4: one epoch (2 steps of 32) shows every image once, both bad ones too.
    proc = _run([sys.executable, "rskdist/train.py", "--config", "configs/debug.yaml", f"run.output_dir={tmp_path}",
                 "data.source=shards", f"data.root={root}", "data.num_workers=0", "data.global_batch=32",
                 "run.max_steps=0", "run.epochs=1", "eval.every_epochs=0", "model.pretrained="])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bad images replaced" in proc.stdout
    written = records(tmp_path / "debug")
    steps = [r for r in written if r["kind"] == "train"]
    assert steps[-1]["bad_samples"] == 2
    evals = [r for r in written if r["kind"] == "eval"]
    assert evals[-1]["eval/num_unreadable_images"] == 1 and evals[-1]["eval/num_queries"] <= 11
    summary = read_summary(tmp_path / "debug")
    assert summary["bad_samples"] == 2 and summary["final_eval"]["num_unreadable_images"] == 1


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs: room for one checkpoint of configs/debug.yaml (1.9 MB), not two."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_stops_the_run_and_keeps_the_last_checkpoint(small_disk):
    proc = _run(_cmd("rskdist/train.py", small_disk) + ["run.max_steps=8", "run.save_every=2",
                                                         "run.loggers=[]"])
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "cannot write" in out and "the previous checkpoint step00000002 and latest are intact" in out
    assert (small_disk / "debug" / "checkpoints" / "latest").read_text() == "step00000002"
