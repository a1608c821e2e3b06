"""tools/study.py: cells and their ids, up-front validation, resumability, the report's
aggregation (against numpy over fabricated run folders), the SLURM command lines, and
one real two-cell study through the deepspeed launcher."""

import csv
import importlib.util
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from rskdist.config import load_config, save_config
from rskdist.runlog import read_summary

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("study", ROOT / "tools" / "study.py")
study_tool = importlib.util.module_from_spec(_spec)
sys.modules["study"] = study_tool  # dataclasses look their module up by name
_spec.loader.exec_module(study_tool)

DEBUG = str(ROOT / "configs" / "debug.yaml")


def _study(tmp_path, axes, seeds=(0,), sets=(), **kw) -> "study_tool.Study":
    return study_tool.Study(config=DEBUG, out=str(tmp_path / "study"), axes=[study_tool.parse_axis(a) for a in axes],
                            seeds=list(seeds), sets=list(sets), command="python tools/study.py (test)", **kw)


def _fake_run(study, cell, recall1: float, *, best_step: int = 2, per_rank=(800.0, 810.0), ips=(50.0, 100.0, 120.0)):
    """A finished run folder as the trainer leaves it: config.yaml, metrics.jsonl, summary.json."""
    run_dir = study.run_dir(cell)
    run_dir.mkdir(parents=True)
    save_config(load_config(study.config, study.overrides(cell)), run_dir / "config.yaml")
    train = [{"step": s + 1, "kind": "train", "loss": 0.3, "images_per_s": v,
              "rss_peak_mb_max": max(per_rank) + s, "rss_peak_mb_per_rank": [p + s for p in per_rank]}
             for s, v in enumerate(ips)]
    final = {"recall@1": recall1, "recall@2": recall1 + 0.1, "map@r": recall1 / 2, "r_precision": recall1 / 3,
             "num_queries": 128, "eval_seconds": 0.2}
    records = train + [{"step": len(ips), "kind": "eval", **{f"eval/{k}": v for k, v in final.items()}}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    best = {"metric": "recall@1", "mode": "max", "best_value": recall1 + 0.01, "best_step": best_step, "history": []}
    (run_dir / "summary.json").write_text(json.dumps({"step": len(ips), "final_eval": final, "best": best}))


# ----------------------------------------------------------------------------- cells
def test_axis_values_split_at_top_level_commas_only():
    assert study_tool.split_values("a, b,[1, 2],{x: 1, y: 2}") == ["a", "b", "[1, 2]", "{x: 1, y: 2}"]
    assert study_tool.parse_axis("eval.ks=[1, 2],[4]") == ("eval.ks", ["[1, 2]", "[4]"])
    for bad in ("loss.tau2", "tau2=0.1,0.2", "loss.tau2=0.1,,0.2", "loss.tau2=0.1,0.1"):
        with pytest.raises(ValueError, match="--axis"):
            study_tool.parse_axis(bad)


def test_cells_are_the_product_of_axes_times_seeds_with_unique_ids():
    axes = [("loss.tau2", ["0.01", "0.1"]), ("data.global_batch", ["64", "256", "1024"])]
    cells = study_tool.expand(axes, [0, 1])
    assert len(cells) == 2 * 3 * 2
    assert [c.values for c in cells[:4]] == [(("loss.tau2", "0.01"), ("data.global_batch", "64"))] * 2 + [
        (("loss.tau2", "0.01"), ("data.global_batch", "256"))] * 2
    assert [c.seed for c in cells[:4]] == [0, 1, 0, 1]
    assert cells[0].cell_id == "tau2-0.01__global_batch-64" and cells[1].name == "tau2-0.01__global_batch-64__seed1"
    assert len({c.name for c in cells}) == len(cells)
    assert cells[0].overrides() == ["loss.tau2=0.01", "data.global_batch=64"]
    # The same last name under two sections keeps the section; values needing cleanup stay apart.
    cells = study_tool.expand([("loss.name", ["a"]), ("optim.name", ["a b", "a/b"])], [0])
    assert cells[0].cell_id.startswith("loss.name-a__optim.name-a-b-")
    assert len({c.cell_id for c in cells}) == 2
    assert all(re.fullmatch(r"[A-Za-z0-9._+-]+", c.name) for c in cells)
    assert study_tool.expand([], [3])[0].name == "base__seed3"


def test_study_overrides_put_the_cell_after_the_sets_and_own_the_run_folder(tmp_path):
    study = _study(tmp_path, ["loss.tau2=0.1"], seeds=[7], sets=["run.max_steps=2"])
    cell = study.cells[0]
    assert study.overrides(cell) == ["run.max_steps=2", "loss.tau2=0.1", "run.seed=7",
                                     f"run.output_dir={tmp_path / 'study' / 'cells'}", f"run.name={cell.name}",
                                     "run.resume=auto"]
    cfg = load_config(DEBUG, study.overrides(cell))
    assert (cfg.loss.tau2, cfg.run.seed, cfg.run.max_steps) == (0.1, 7, 2)


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("args, message", [
    (["--axis", "loss.tua2=0.01,0.1"], r"--axis 'loss.tua2=0.01': config: unknown key 'loss.tua2'; valid keys"),
    (["--axis", "loss.tau2=0.01,abc"], r"--axis 'loss.tau2=abc': config: loss.tau2 must be float"),
    (["--set", "data.global_bach=64"], r"--set 'data.global_bach=64': config: unknown key"),
    (["--axis", "data.global_batch=64,30"], r"cell global_batch-30__seed0 .*cannot be split over 2 ranks"),
    (["--axis", "run.seed=1,2"], r"run.seed is set by --seeds"),
    (["--axis", "loss.tau2=0.1,0.2", "--set", "loss.tau2=0.3"], r"loss.tau2 is both an --axis and a --set"),
])
def test_a_bad_axis_fails_before_anything_runs(tmp_path, capsys, args, message):
    out = tmp_path / "study"
    code = study_tool.main(["--config", DEBUG, "--out", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert re.search(message, err), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()  # nothing created, nothing launched


def test_a_run_folder_with_another_config_is_refused(tmp_path):
    study = _study(tmp_path, ["loss.tau2=0.1"], sets=["run.max_steps=2"])
    _fake_run(study, study.cells[0], 0.5)
    study_tool.check(study)  # same config: fine
    changed = _study(tmp_path, ["loss.tau2=0.1"], sets=["run.max_steps=3"])
    with pytest.raises(ValueError, match=r"different config \(run.max_steps: 2 there, 3 now\)"):
        study_tool.check(changed)


# ----------------------------------------------------------------------------- running
def test_done_cells_are_skipped_and_a_failure_does_not_stop_the_study(tmp_path, capsys):
    study = _study(tmp_path, ["loss.tau2=0.01,0.1,1.0"])
    Path(study.out).mkdir(parents=True)
    cells = study.cells
    _fake_run(study, cells[0], 0.4)  # finished by an earlier invocation
    launched = []

    def launch(st, cell, timeout):
        launched.append(cell.name)
        if cell.name == cells[1].name:
            return 1  # this cell's training failed
        _fake_run(st, cell, 0.6)
        return 0

    state = {}
    study_tool.run_local(study, state, timeout=10, launch=launch)
    assert launched == [cells[1].name, cells[2].name]
    out = capsys.readouterr().out
    assert "3 runs (3 cells x 1 seeds), 1 done already, 2 to run" in out
    assert f"[1/3] {cells[0].name}: done already, skipped" in out
    assert f"[2/3] {cells[1].name}: FAILED (exit 1)" in out and str(study.log_path(cells[1])) in out
    assert re.search(rf"\[3/3\] {cells[2].name}: done in [\d.]+ s \| recall@1 0.6100 \(best, step 2\)", out)
    assert state[cells[1].name]["status"] == "failed" and state[cells[2].name]["status"] == "done"
    assert json.loads((Path(study.out) / "state.json").read_text()) == state

    launched.clear()
    study_tool.run_local(study, state, timeout=10, launch=lambda st, cell, t: launched.append(cell.name) or 1)
    assert launched == [cells[1].name]  # only the failed one is retried

    def interrupted(st, cell, timeout):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        study_tool.run_local(study, state, timeout=10, launch=interrupted)
    assert state[cells[1].name]["status"] == "interrupted"
    assert study_tool.collect(study, state)[1]["status"] == "interrupted"


# ----------------------------------------------------------------------------- aggregation
def test_report_means_stds_and_best_cell_from_run_folders(tmp_path):
    study = _study(tmp_path, ["loss.tau2=0.01,0.1", "data.global_batch=32,64"], seeds=[0, 1, 2])
    Path(study.out).mkdir(parents=True)
    study.save()
    rng = np.random.default_rng(0)
    truth, failed = {}, study.cells[-1]  # the last cell's seed 2 fails
    for cell in study.cells:
        if cell.name == failed.name:
            continue
        r1 = float(rng.uniform(0.2, 0.8))
        truth.setdefault(cell.cell_id, []).append(r1)
        _fake_run(study, cell, r1, per_rank=(float(rng.uniform(700, 900)), 800.0))
    state = {failed.name: {"status": "failed", "exit_code": 1, "log": "/logs/x.log"}}
    (Path(study.out) / "state.json").write_text(json.dumps(state))

    assert study_tool.main(["--collect", "--out", study.out]) == 0
    out = Path(study.out)
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 12
    assert {"loss.tau2", "data.global_batch", "seed", "status", "recall@1", "recall@2", "map@r", "best_value",
            "best_step", "images_per_s", "rss_peak_mb_per_rank", "wall_seconds"} <= set(rows[0])
    assert sum(r["status"] == "done" for r in rows) == 11
    bad = next(r for r in rows if r["status"] != "done")
    assert (bad["cell"], bad["seed"], bad["status"], bad["log"]) == (failed.cell_id, "2", "failed", "/logs/x.log")
    # images/s skips the first (start-up) step; peak memory is each rank's maximum over steps.
    assert float(rows[0]["images_per_s"]) == 110.0
    first = json.loads((study.run_dir(study.cells[0]) / "metrics.jsonl").read_text().splitlines()[2])
    assert rows[0]["rss_peak_mb_per_rank"] == " ".join(f"{v:.1f}" for v in first["rss_peak_mb_per_rank"])

    report = (out / "report.md").read_text()
    best = max(truth, key=lambda c: np.mean(truth[c]) + 0.01)
    for cell_id, values in truth.items():
        line = next(l for l in report.splitlines() if l.startswith("| ") and _row_matches(l, study, cell_id))
        v = np.array(values)
        assert f"{v.mean():.4f} ± {v.std(ddof=1):.4f}" in line, line  # recall@1
        assert f"{(v + 0.01).mean():.4f} ± {(v + 0.01).std(ddof=1):.4f}" in line, line  # best recall@1
        assert f"| {len(values)}/3 |" in line
        assert line.rstrip().endswith("**best** |") == (cell_id == best), line
    assert report.count("**best** |") == 1
    assert f"- {failed.cell_id} seed 2: failed (exit 1), log `/logs/x.log`" in report
    assert "python tools/study.py (test)" in report
    assert (out / "study.png").stat().st_size > 10_000


def _row_matches(line: str, study, cell_id: str) -> bool:
    cell = next(c for c in study.cells if c.cell_id == cell_id)
    return line.startswith("| " + " | ".join(v for _, v in cell.values) + " |")


def test_single_seed_cells_show_no_spread_and_non_numeric_axes_draw_nothing(tmp_path):
    study = _study(tmp_path, ["loss.mix=simix,none"])
    Path(study.out).mkdir(parents=True)
    for cell, r1 in zip(study.cells, (0.3, 0.5)):
        _fake_run(study, cell, r1)
    rows = study_tool.write_outputs(study, {})
    assert [r["status"] for r in rows] == ["done", "done"]
    report = (Path(study.out) / "report.md").read_text()
    assert "| none | 1/1 | 0.5000 | 0.6000 |" in report and "±" not in report.split("## Failures")[0].split("|---")[1]
    assert "None: every run finished." in report
    assert not (Path(study.out) / "study.png").exists()


# ----------------------------------------------------------------------------- slurm
def test_slurm_command_lines_survive_the_launchers_reparse(tmp_path):
    kwargs = "model.backbone_kwargs={patch_size: 8, depth: 1, embed_dim: 64, num_heads: 2}"
    study = _study(tmp_path, [f"{kwargs}"], sets=["eval.ks=[1, 2]"], launcher="slurm", nodes=2, nproc=4)
    cell = study.cells[0]
    cmd = study_tool.slurm_command(study, cell)
    assert cmd[:4] == ["sbatch", "--parsable", "--nodes", "2"]
    assert cmd[cmd.index("--output") + 1] == f"{study.out}/logs/{cell.name}-%j.out"
    script_at = cmd.index("launchers/slurm.sbatch")
    # launchers/slurm.sbatch hands "$CONFIG $*" to `bash -c` (joined, then parsed again by bash).
    sbatch = (ROOT / "launchers" / "slurm.sbatch").read_text()
    assert 'CONFIG=${1:?' in sbatch and "rskdist/train.py --config $CONFIG $*\"" in sbatch
    reparse = tmp_path / "reparse.sh"
    reparse.write_text('CONFIG=$1\nshift\nbash -c "printf \'%s\\n\' $CONFIG $*"\n')
    proc = subprocess.run(["bash", str(reparse), *cmd[script_at + 1:]], capture_output=True, text=True, check=True)
    assert proc.stdout.splitlines() == [study.config, *study.overrides(cell)]


def test_dry_run_prints_every_command_and_starts_nothing(tmp_path, capsys):
    out = tmp_path / "study"
    code = study_tool.main(["--config", DEBUG, "--axis", "loss.tau2=0.01,0.1", "--seeds", "0", "1", "--out", str(out),
                            "--launcher", "slurm", "--dry-run"])
    text = capsys.readouterr().out
    assert code == 0 and not out.exists()
    commands = [shlex.split(l) for l in text.splitlines() if l.startswith("  ")]
    assert len(commands) == 4 and all(c[0] == "sbatch" and "launchers/slurm.sbatch" in c for c in commands)
    assert "loss.tau2=0.1" in commands[3] and "run.seed=1" in commands[3]


# ----------------------------------------------------------------------------- the real thing
@pytest.mark.integration
def test_two_cell_study_through_the_real_launcher(tmp_path):
    out = tmp_path / "study"
    cmd = [sys.executable, "tools/study.py", "--config", "configs/debug.yaml", "--axis", "data.global_batch=16,32",
           "--seeds", "0", "--out", str(out), "--set", "run.max_steps=2", "--set", "eval.every_epochs=0",
           "--set", "eval.synthetic_size=64", "--set", "run.save_every=0", "--set", "run.loggers=[]",
           "--set", "data.chunk_size=8"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 runs (2 cells x 1 seeds), 0 done already, 2 to run" in proc.stdout
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["data.global_batch"], r["status"], r["steps"]) for r in rows] == [("16", "done", "2"),
                                                                                ("32", "done", "2")]
    for row in rows:
        summary = read_summary(Path(row["run_dir"]))
        assert float(row["recall@1"]) == summary["final_eval"]["recall@1"]
        assert len(row["rss_peak_mb_per_rank"].split()) == 2  # one peak per rank
        assert float(row["images_per_s"]) > 0 and float(row["wall_seconds"]) > 0
    report = (out / "report.md").read_text()
    assert report.count("**best** |") == 1 and "None: every run finished." in report
    assert (out / "study.png").stat().st_size > 10_000
    first = time.perf_counter() - t0

    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "2 done already, 0 to run" in again.stdout and again.stdout.count("done already, skipped") == 2
    print(f"two-cell study: {first:.0f} s")
