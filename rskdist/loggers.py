"""Experiment trackers beside RUN/metrics.jsonl: TensorBoard, MLflow and Weights & Biases.

`run.loggers` names them; rank 0 opens them (RunLogger, rskdist/runlog.py). Each gets the
flattened config as parameters, every record's numbers as metrics under their metrics.jsonl
names (`tracked_name` maps what a backend refuses, the same way for all: recall@1 ->
recall_at_1), and files: config.yaml and summary.json when training ends, report.md and its
plot when tools/report.py writes them.

A tracker's calls run in order on a thread of its own, so a training step never waits for
a server: start-up waits at most START_SECONDS, the end of the run at most CLOSE_SECONDS,
and MLflow's HTTP client gives up on an unreachable server in seconds (MLFLOW_HTTP_DEFAULTS).
The first call that fails ends that tracker for the run: one warning, training goes on.
The backend's run id is kept in RUN/trackers.json, so a resumed run continues the same
tracked run. docs/tracking.md.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import os
import queue
import re
import socket
import threading
import time
from pathlib import Path

LOGGERS = ("tensorboard", "mlflow", "wandb")
EXTRAS = {"mlflow": "mlflow", "wandb": "wandb"}  # logger -> the module its optional extra installs
TRACKERS_FILE = "trackers.json"
START_SECONDS = 60.0  # the longest start-up waits for a tracker's run to open
CLOSE_SECONDS = 30.0  # the longest the end of a run waits for a tracker's pending calls
MAX_PENDING = 10_000  # calls a tracker may fall behind training before it is dropped
# MLflow's client retries an unreachable server with backoff for minutes by default; with
# these a refused connection fails in about 3 s and a silent server in about 3 x 5 s, plus
# backoff (on the tracker's thread). Variables already set win.
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                        "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}

_REFUSED = re.compile(r"[^A-Za-z0-9_\-./ ]")  # outside what MLflow accepts in a name


def tracked_name(key: str) -> str:
    """The name every tracker gets for a metrics.jsonl key or config key: `@` -> `_at_`
    (eval/recall@1 -> eval/recall_at_1, map@r -> map_at_r), any other character outside
    letters, digits and `_-./ ` -> `_`."""
    return _REFUSED.sub("_", key.replace("@", "_at_"))


def flatten_params(tree: dict, prefix: str = "") -> dict[str, str]:
    """Nested mappings as dotted names with their values as text (lists and numbers as
    JSON): {"optim.lr": "0.001", "loss.ks": "[1, 2, 4]", "model.backbone_kwargs.depth": "2"}."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten_params(value, f"{name}."))
        else:
            out[tracked_name(name)] = value if isinstance(value, str) else json.dumps(value)
    return out


def check_loggers(loggers: list[str]) -> None:
    """Each logger once, and its library installed (a ValueError naming the extra)."""
    for name in loggers:
        if loggers.count(name) > 1:
            raise ValueError(f"config: run.loggers lists {name} twice; name each logger once")
        module = EXTRAS.get(name)
        if module and not _importable(module):
            raise ValueError(f"config: run.loggers names {name}, whose library is not installed: "
                             f"pip install 'rskdist[{name}]' (or remove {name} from run.loggers)")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: a module set to None in sys.modules
        return False


def read_trackers(run_dir: Path) -> dict:
    """RUN/trackers.json: {logger: what its start returned (the backend's run id, ...)}."""
    path = Path(run_dir) / TRACKERS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


# ----------------------------------------------------------------------- the backends
class Tracker:
    """One backend. `start` opens a run, or continues the one `previous` (what an earlier
    start returned) names, and returns what to keep in trackers.json; `params` None attaches
    to the previous run only to add files. Every call runs on the tracker's own thread."""

    name = ""
    where = ""  # where the run goes, for the start-up line

    def start(self, run_dir: Path, run_name: str, params: dict[str, str] | None, previous: dict | None) -> dict:
        raise NotImplementedError

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def log_files(self, paths: list[Path], step: int) -> None:
        raise NotImplementedError

    def finish(self, status: str | None) -> None:
        """status: "FINISHED", "KILLED" (stopped by SIGTERM, resumable), None (leave it)."""
        raise NotImplementedError


class TensorBoardTracker(Tracker):
    """Event files in RUN/tb/: the config in the HPARAMS dashboard, text files as text,
    plots as images."""

    name = "tensorboard"

    def start(self, run_dir, run_name, params, previous):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.writer = SummaryWriter(str(run_dir / "tb"))
        if params:
            for event in hparams(params, {}):
                self.writer.file_writer.add_summary(event)
        self.where = f"event files in {run_dir / 'tb'}"
        return {"log_dir": str(run_dir / "tb")}

    def log_metrics(self, metrics, step):
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def log_files(self, paths, step):
        for path in paths:
            if path.suffix == ".png":
                import numpy as np
                from PIL import Image

                self.writer.add_image(path.name, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")
            else:  # markdown renders; YAML and JSON as a code block
                text = path.read_text()
                self.writer.add_text(path.name, text if path.suffix == ".md" else "    " + text.replace("\n", "\n    "),
                                     step)
        self.writer.flush()

    def finish(self, status):
        self.writer.close()


class MlflowTracker(Tracker):
    """A run at MLFLOW_TRACKING_URI (default: an SQLite store in RUN/mlruns) in experiment
    MLFLOW_EXPERIMENT_NAME (default rskdist)."""

    name = "mlflow"

    def start(self, run_dir, run_name, params, previous):
        for key, value in MLFLOW_HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        from mlflow import MlflowClient

        local = run_dir.resolve() / "mlruns"
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{local / 'mlflow.db'}"
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            local.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=uri)
        if previous and previous.get("tracking_uri") == uri:
            self.run_id, how = previous["run_id"], "continued"
            if params is not None:
                self.client.update_run(self.run_id, status="RUNNING")
        else:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "rskdist"
            artifacts = None if os.environ.get("MLFLOW_TRACKING_URI") else (local / "artifacts").as_uri()
            experiment = self._experiment(name, artifacts)
            self.run_id = self.client.create_run(experiment, run_name=run_name).info.run_id
            how = f"experiment {name}: new"
        if params:
            self._log_params(params)
        self.where = f"{how} run {self.run_id} at {uri}"
        return {"run_id": self.run_id, "tracking_uri": uri}

    def _experiment(self, name: str, artifact_location: str | None) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=artifact_location)
        except Exception:  # noqa: BLE001 - another run created it meanwhile
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def _log_params(self, params: dict[str, str]) -> None:
        """MLflow keeps a parameter's first value: a resumed run's changed ones (a longer
        run.max_steps, ...) become tags resumed.<key>."""
        from mlflow.entities import Param, RunTag

        have = self.client.get_run(self.run_id).data.params
        self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items() if k not in have],
                              tags=[RunTag(f"resumed.{k}", v) for k, v in params.items() if k in have and have[k] != v])

    def log_metrics(self, metrics, step):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def log_files(self, paths, step):
        for path in paths:
            self.client.log_artifact(self.run_id, str(path))

    def finish(self, status):
        if status is not None:
            self.client.set_terminated(self.run_id, status)


class WandbTracker(Tracker):
    """A run in project WANDB_PROJECT (default rskdist) under RUN/wandb/ (or WANDB_DIR);
    mode WANDB_MODE, else online where W&B credentials exist and its server answers, else
    offline (`wandb sync` uploads it later)."""

    name = "wandb"

    def start(self, run_dir, run_name, params, previous):
        import wandb

        project = os.environ.get("WANDB_PROJECT") or "rskdist"
        mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_reachable() else "offline")
        settings = {"console": "off"}  # the progress line stays ours
        if "WANDB_QUIET" not in os.environ and "WANDB_SILENT" not in os.environ:
            settings["quiet"] = True  # no run-history table at the end
        if "WANDB_INIT_TIMEOUT" not in os.environ:
            settings["init_timeout"] = START_SECONDS / 2
        run_id = previous.get("id") if previous and previous.get("project") == project else None
        self.run = wandb.init(project=project, name=run_name, id=run_id, resume="allow" if run_id else None,
                              dir=None if os.environ.get("WANDB_DIR") else str(run_dir), mode=mode,
                              settings=wandb.Settings(**settings))
        if params:
            self.run.config.update(params, allow_val_change=True)
        self.where = (f"{'continued' if run_id else 'new'} {mode} run {self.run.id} in project {project}, "
                      f"{Path(self.run.dir).parent}" + (" (`wandb sync` uploads it)" if mode == "offline" else ""))
        return {"id": self.run.id, "project": project}

    def log_metrics(self, metrics, step):
        self.run.log(metrics, step=step)

    def log_files(self, paths, step):
        for path in paths:
            self.run.save(str(path), base_path=str(path.parent), policy="now")

    def finish(self, status):
        self.run.finish(exit_code=143 if status == "KILLED" else 0)


def _wandb_reachable() -> bool:
    """W&B credentials (WANDB_API_KEY or a netrc entry) and its server answering a TCP
    connect within 3 s."""
    import netrc
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    if not os.environ.get("WANDB_API_KEY"):
        try:
            if netrc.netrc(os.environ.get("NETRC")).authenticators(url.hostname) is None:
                return False
        except (OSError, netrc.NetrcParseError):
            return False
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3).close()
    except OSError:
        return False
    return True


TRACKERS = {"tensorboard": TensorBoardTracker, "mlflow": MlflowTracker, "wandb": WandbTracker}
assert tuple(TRACKERS) == LOGGERS


# ----------------------------------------------------------------------- the run's trackers
class _Worker:
    """Runs one tracker's calls in order on a daemon thread; after the first that fails it
    skips the rest."""

    def __init__(self, tracker: Tracker):
        self.tracker = tracker
        self.error: str | None = None
        self._calls: queue.Queue = queue.Queue(maxsize=MAX_PENDING)
        self._stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name=f"rskdist-{tracker.name}", daemon=True)
        self.thread.start()

    def submit(self, method: str, *args) -> concurrent.futures.Future:
        future = concurrent.futures.Future()
        try:
            self._calls.put_nowait((future, method, args))
        except queue.Full:
            self.error = self.error or f"fell {MAX_PENDING} calls behind training (the backend is too slow)"
        return future

    def stop(self) -> None:
        """No more calls: the thread ends once the queued ones are done (never blocks)."""
        self._stopped.set()

    def _loop(self) -> None:
        while True:
            try:
                future, method, args = self._calls.get(timeout=0.2)
            except queue.Empty:
                if self._stopped.is_set():
                    return
                continue
            if self.error is not None:
                future.cancel()
                continue
            t0 = time.monotonic()
            try:
                future.set_result(getattr(self.tracker, method)(*args))
            except Exception as exc:  # noqa: BLE001 - any failure of a tracker drops it, never the run
                seconds = time.monotonic() - t0
                self.error = f"{method} failed after {seconds:.1f} s: {type(exc).__name__}: {str(exc)[:300]}"
                future.set_exception(exc)


class Trackers:
    """The trackers of one run folder (rank 0): started, fed and closed together.

    `fresh` starts new tracked runs; otherwise those trackers.json names are continued.
    `attach` opens only trackers with a saved run, to add files (tools/report.py).
    A tracker whose call fails is dropped and its failure kept for `failures()`.
    """

    def __init__(self, names, run_dir: Path, *, run_name: str, params: dict[str, str] | None, fresh: bool,
                 attach: bool = False):
        self.run_dir = Path(run_dir)
        saved = {} if fresh else read_trackers(self.run_dir)
        self._workers: dict[str, _Worker] = {}
        self._failed: list[tuple[str, str]] = []
        self.started: list[str] = []  # "mlflow: new run ... at ...", one per tracker that started
        t0 = time.monotonic()
        starting = {}
        for name in names:
            if attach and name not in saved:
                continue
            worker = _Worker(TRACKERS[name]())
            starting[name] = (worker, worker.submit("start", self.run_dir, run_name, params, saved.get(name)))
        for name, (worker, future) in starting.items():
            try:
                saved[name] = future.result(timeout=max(0.0, t0 + START_SECONDS - time.monotonic()))
            except concurrent.futures.TimeoutError:
                worker.error = f"start: no answer within {START_SECONDS:g} s; abandoned"
            except Exception:  # noqa: BLE001 - the worker holds the message
                pass
            if worker.error is None:
                self._workers[name] = worker
                self.started.append(f"{name}: {worker.tracker.where}")
            else:
                worker.stop()
                self._failed.append((name, worker.error))
        if not attach:
            (self.run_dir / TRACKERS_FILE).write_text(json.dumps(saved, indent=2))

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Queue one record's numbers for every tracker (returns at once)."""
        named = {tracked_name(k): float(v) for k, v in metrics.items()}
        for worker in self._workers.values() if named else ():
            worker.submit("log_metrics", named, step)
        self._collect()

    def close(self, files: list[Path], step: int, status: str | None) -> None:
        """Add `files`, finish every run and wait for them, at most CLOSE_SECONDS."""
        for worker in self._workers.values():
            worker.submit("log_files", [Path(f) for f in files], step)
            worker.submit("finish", status)
            worker.stop()
        deadline = time.monotonic() + CLOSE_SECONDS
        for name, worker in list(self._workers.items()):
            worker.thread.join(max(0.0, deadline - time.monotonic()))
            if worker.thread.is_alive():
                worker.error = worker.error or f"calls still pending {CLOSE_SECONDS:g} s after the run ended; abandoned"
        self._collect()
        self._workers.clear()

    def failures(self) -> list[tuple[str, str]]:
        """(tracker, what failed) for the trackers dropped since the last call."""
        out, self._failed = self._failed, []
        return out

    def _collect(self) -> None:
        for name, worker in list(self._workers.items()):
            if worker.error is not None:
                del self._workers[name]
                worker.stop()
                self._failed.append((name, worker.error))


def add_files(run_dir: Path, names, files: list[Path], step: int) -> tuple[list[str], list[str]]:
    """Add files written after training (tools/report.py: report.md, recall.png) to the runs
    trackers.json names; (where they went, warning lines)."""
    trackers = Trackers(names, run_dir, run_name=Path(run_dir).name, params=None, fresh=False, attach=True)
    trackers.close(files, step, None)
    return trackers.started, [f"{name}: could not add the files: {error}" for name, error in trackers.failures()]
