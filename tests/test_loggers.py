"""Experiment trackers (run.loggers, rskdist/loggers.py) against the real backends: an MLflow
tracking server started here on loopback, W&B in offline mode (its run files read back),
TensorBoard's event files; and the names, parameters and config checks they rest on."""

import dataclasses
import json
import os
import signal
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from launching import ROOT, launch_env, records, run_cmd, train_losses

from rskdist.comm import free_port
from rskdist.config import load_config, validate
from rskdist.loggers import flatten_params, read_trackers, tracked_name


# ----------------------------------------------------------------------- unit
def test_names_every_tracker_accepts():
    assert tracked_name("eval/recall@1") == "eval/recall_at_1"
    assert tracked_name("eval/val/map@r") == "eval/val/map_at_r"
    assert tracked_name("loss") == "loss" and tracked_name("rss_peak_mb_max") == "rss_peak_mb_max"
    assert tracked_name("model.backbone_kwargs.a[0]+b") == "model.backbone_kwargs.a_0__b"


def test_flattened_config_as_parameters():
    cfg = load_config(ROOT / "configs/debug.yaml", ["run.max_steps=3"])
    params = flatten_params(dataclasses.asdict(cfg))
    assert params["run.max_steps"] == "3" and params["optim.lr"] == "0.001"
    assert params["model.backbone_kwargs.depth"] == "2" and params["loss.ks"] == "[1, 2, 4, 8, 16]"
    assert params["model.pretrained"] == "" and params["run.loggers"] == '["tensorboard"]'
    assert params["deepspeed.extra"] == "{}"  # an empty mapping stays one parameter
    assert all(isinstance(v, str) for v in params.values())


def test_logger_config_errors(monkeypatch):
    with pytest.raises(ValueError, match=r"run.loggers\[1\]='neptune' is not one of 'tensorboard', 'mlflow', 'wandb'"):
        load_config(None, ["run.loggers=[tensorboard, neptune]"])
    with pytest.raises(ValueError, match="run.loggers lists tensorboard twice"):
        validate(load_config(None, ["run.loggers=[tensorboard, tensorboard]"]), world_size=1)
    with pytest.raises(ValueError, match=r"'run.tensorboard' was replaced: use run.loggers=\[tensorboard\]"):
        load_config(None, ["run.tensorboard=false"])
    cfg = load_config(None, ["run.loggers=[tensorboard, wandb]"])
    validate(cfg, world_size=1)
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if the extra were not installed
    with pytest.raises(ValueError, match=r"names wandb, whose library is not installed: pip install 'rskdist\[wandb\]"):
        validate(cfg, world_size=1)


# ----------------------------------------------------------------------- training runs
def _env(**extra) -> dict:
    env = {k: v for k, v in launch_env().items() if not k.startswith(("MLFLOW_", "WANDB_"))}
    return dict(env, MLFLOW_DISABLE_TELEMETRY="true", **extra)


def _train(out: Path, name: str, *overrides, env: dict, wait: bool = True):
    cmd = [sys.executable, "rskdist/train.py", "--config", "configs/debug.yaml", f"run.output_dir={out}",
           f"run.name={name}", "run.save_every=0", *overrides]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return run_cmd(cmd, timeout=600, environ=env)


def _tracker_warnings(stderr: str, name: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"warning: {name} logger dropped")]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on a free loopback port, SQLite store, one worker and no job runner
    (each of its processes imports MLflow: up in about 30 s here instead of 100)."""
    pytest.importorskip("mlflow", reason="pip install 'rskdist[mlflow]'")
    store = tmp_path_factory.mktemp("mlflow")
    url = f"http://127.0.0.1:{free_port()}"
    log = open(store / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
                             url.rsplit(":", 1)[1], "--workers", "1", "--backend-store-uri",
                             f"sqlite:///{store / 'db'}", "--default-artifact-root", str(store / "art")],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"))
    deadline = time.monotonic() + 240
    while True:
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).read() == b"OK":
                break
        except OSError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, (store / "server.log").read_text()[-3000:]
        time.sleep(0.5)
    yield {"url": url, "proc": proc}
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its workers
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    log.close()


@pytest.mark.integration
def test_mlflow_round_trip_resume_and_report(mlflow_server, tmp_path):
    """A 3-step run's parameters, loss history, evaluation and files are on the server (and
    in TensorBoard under the same names); a resume to step 5 appends to the same MLflow
    run; tools/report.py adds report.md and its plot to it."""
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    env = _env(MLFLOW_TRACKING_URI=mlflow_server["url"], MLFLOW_EXPERIMENT_NAME="round-trip")
    proc = _train(tmp_path, "tracked", "run.max_steps=3", "run.loggers=[tensorboard, mlflow]", env=env)
    run = tmp_path / "tracked"
    assert not _tracker_warnings(proc.stderr, "mlflow"), proc.stderr[-2000:]
    run_id = read_trackers(run)["mlflow"]["run_id"]
    client = MlflowClient(tracking_uri=mlflow_server["url"])
    tracked = client.get_run(run_id)
    assert client.get_experiment(tracked.info.experiment_id).name == "round-trip"
    assert tracked.info.status == "FINISHED" and tracked.info.run_name == "tracked"
    assert tracked.data.params["run.max_steps"] == "3" and tracked.data.params["optim.lr"] == "0.001"

    def history(key):
        return {m.step: m.value for m in client.get_metric_history(run_id, key)}

    losses = train_losses(run)
    assert sorted(losses) == [1, 2, 3] and history("loss") == losses
    (final,) = records(run, "eval")
    assert history("eval/recall_at_1") == {3: final["eval/recall@1"]}
    assert history("eval/map_at_r") == {3: final["eval/map@r"]}
    assert {a.path for a in client.list_artifacts(run_id)} == {"config.yaml", "summary.json"}

    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    assert {e.step: e.value for e in events.Scalars("loss")} == pytest.approx(losses)
    assert [e.step for e in events.Scalars("eval/recall_at_1")] == [3]

    _train(tmp_path, "tracked", "run.max_steps=5", "run.loggers=[tensorboard, mlflow]", env=env)
    assert read_trackers(run)["mlflow"]["run_id"] == run_id
    losses = train_losses(run)
    assert sorted(losses) == [1, 2, 3, 4, 5]
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == [1, 2, 3, 4, 5]  # each step once
    assert history("loss") == losses and set(history("eval/recall_at_1")) == {3, 5}
    tracked = client.get_run(run_id)
    assert tracked.info.status == "FINISHED"
    # MLflow keeps a parameter's first value; the resumed run's change is a tag.
    assert tracked.data.params["run.max_steps"] == "3" and tracked.data.tags["resumed.run.max_steps"] == "5"
    assert len(client.search_runs([tracked.info.experiment_id])) == 1

    report = subprocess.run([sys.executable, "tools/report.py", str(run)], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env=env)
    assert report.returncode == 0, report.stderr[-3000:]
    assert "added report.md and recall.png to mlflow" in report.stdout
    assert {"report.md", "recall.png"} <= {a.path for a in client.list_artifacts(run_id)}
    assert client.get_run(run_id).info.status == "FINISHED"


def _wandbrecords(path: Path):
    """The records of a W&B transaction log (run-ID.wandb): a ':W&B' header, then LevelDB-log
    framing (32 KiB blocks; each piece a 7-byte header: CRC, length, kind) around protobufs."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += block - pos % block
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


@pytest.mark.integration
def test_unreachable_mlflow_is_dropped_while_wandb_offline_records_the_run(tmp_path):
    """MLflow pointed at a port nobody listens on costs a few seconds at start-up and one
    warning; the run completes, and W&B (offline) writes the same metrics, parameters and
    files into RUN/wandb/."""
    pytest.importorskip("wandb", reason="pip install 'rskdist[wandb]'")
    env = _env(MLFLOW_TRACKING_URI=f"http://127.0.0.1:{free_port()}", WANDB_MODE="offline")
    proc = _train(tmp_path, "offline", "run.max_steps=3", "run.loggers=[mlflow, wandb]", env=env)
    run = tmp_path / "offline"
    (warning,) = _tracker_warnings(proc.stderr, "mlflow")
    assert "start failed after" in warning and "Connection" in warning
    assert float(warning.split("start failed after ")[1].split(" s")[0]) < 15  # import + 2 quick retries
    assert [r["tracker"] for r in records(run, "warning")] == ["mlflow"]
    assert (run / "summary.json").is_file() and "mlflow" not in read_trackers(run)

    (log,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    assert log.name == f"run-{read_trackers(run)['wandb']['id']}.wandb"
    history, config, files = {}, {}, set()
    for record in _wandbrecords(log):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.setdefault(row["_step"], {}).update(row)
        elif kind in ("run", "config"):
            updates = record.run.config.update if kind == "run" else record.config.update
            config.update({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in updates})
        elif kind == "files":
            files |= {f.path for f in record.files.files}
    losses = train_losses(run)
    assert sorted(history) == [1, 2, 3]  # a step per record with numbers (the MLflow warning has none)
    assert {step: row["loss"] for step, row in history.items()} == losses
    (final,) = records(run, "eval")
    assert history[3]["eval/recall_at_1"] == final["eval/recall@1"]
    assert config["run.max_steps"] == "3" and config["optim.lr"] == "0.001"
    assert {"config.yaml", "summary.json"} <= files


@pytest.mark.integration
def test_server_lost_mid_run_warns_once_and_training_goes_on(mlflow_server, tmp_path):
    """The tracking server stops after the first step (this test ends the module's server):
    the run finishes every step, with one warning for MLflow. Last in the module."""
    env = _env(MLFLOW_TRACKING_URI=mlflow_server["url"], MLFLOW_EXPERIMENT_NAME="lost")
    proc = _train(tmp_path, "lost", "run.max_steps=4", "run.loggers=[mlflow]", env=env, wait=False)
    metrics = tmp_path / "lost" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and '"kind": "train"' in metrics.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    os.killpg(mlflow_server["proc"].pid, signal.SIGKILL)
    mlflow_server["proc"].wait(timeout=30)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    (warning,) = _tracker_warnings(stderr, "mlflow")
    assert "log_metrics failed" in warning
    assert sorted(r["step"] for r in records(tmp_path / "lost", "train")) == [1, 2, 3, 4]
    assert [r["tracker"] for r in records(tmp_path / "lost", "warning")] == ["mlflow"]
