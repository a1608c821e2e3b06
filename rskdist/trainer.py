"""The Trainer: composes the builders (rskdist/build.py), the checkpoint manager
(rskdist/checkpoint.py), the run logger (rskdist/runlog.py) and the validator
(rskdist/validator.py), and runs the loop. `train()` reads as the algorithm: resume,
step until the end, evaluate, save.
"""

from __future__ import annotations

import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from rskdist.build import (
    PRECISION_DTYPE, backbone_frozen_steps, build_criterion, build_engine, build_model, deepspeed_config,
    trained_module,
)
from rskdist.checkpoint import CheckpointManager, step_tag
from rskdist.config import Config
from rskdist.loss.saturation import SaturationCheck
from rskdist.parallel.ema import WeightEMA
from rskdist.parallel.layout import BatchLayout
from rskdist.parallel.reshard import world_change
from rskdist.parallel.step_parts import StepLoss
from rskdist.parallel.step import two_pass_step
from rskdist.runlog import RunLogger
from rskdist.startup import RunSetup
from rskdist.store.mirror import RunMirror
from rskdist.validator import Validator


@dataclass
class Context:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    run_dir: Path  # where this process writes the run (the node-local staging folder when run_url is set)
    run_url: str | None = None  # the run folder on an object store, kept in step with run_dir (rskdist/store/mirror.py)
    local_world_size: int = 1  # processes on this node


class Trainer:
    """Owns the engine, the streams and the run folder; `train()` runs to the end."""

    def __init__(self, cfg: Config, ctx: Context, setup: RunSetup):
        """`setup` is what rskdist/startup.py `prepare` worked out and checked for this rank."""
        from rskdist.models import describe

        self.cfg, self.ctx = cfg, ctx
        self.layout, data = setup.layout, setup.data
        self.input_dtype = PRECISION_DTYPE[cfg.deepspeed.precision]
        self.group = dist.group.WORLD if ctx.world_size > 1 else None

        torch.manual_seed(cfg.run.seed)  # same initial weights on every rank
        model = build_model(cfg.model)
        self.model_info = describe(model)
        self.model_spec = model.spec  # the resolved architecture, written beside every checkpoint
        self.train_stream = data.train_stream(self.layout, rank=ctx.rank, mean=model.mean, std=model.std,
                                              device=ctx.device)
        self.steps_per_epoch = self.train_stream.steps_per_epoch
        self.total_steps = cfg.run.max_steps or max(1, round(cfg.run.epochs * self.steps_per_epoch))
        criterion = build_criterion(cfg.loss, embed_dim=cfg.model.embed_dim, num_classes=data.num_classes)
        module = trained_module(model, criterion, proxy_lr_multiplier=cfg.loss.proxy_lr_multiplier,
                                zero_stage=cfg.deepspeed.zero_stage)
        self.frozen_steps = backbone_frozen_steps(cfg.loss, criterion, steps_per_epoch=self.steps_per_epoch)
        self.engine, self.scheduler, self.param_groups = build_engine(
            module, cfg.optim, deepspeed_config(cfg.deepspeed, self.layout, grad_clip=cfg.optim.grad_clip),
            steps_per_epoch=self.steps_per_epoch, frozen_steps=self.frozen_steps)
        # The average of the weights (optim.ema_decay), each rank over what it holds (parallel/ema.py).
        self.ema = WeightEMA(self.engine.module, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
        # The loss pass runs on an fp32 copy that the engine lends its proxies to (parallel/step_parts.py, StepLoss).
        self.loss_params_from = None if module is model else self.engine.module.criterion
        self.criterion = criterion if module is model else build_criterion(
            cfg.loss, embed_dim=cfg.model.embed_dim, num_classes=data.num_classes).to(ctx.device)

        self.checkpoints = CheckpointManager(ctx.run_dir / "checkpoints", self.engine, rank=ctx.rank,
                                             keep=cfg.run.keep_checkpoints, barrier=self._barrier, group=self.group,
                                             model_spec=self.model_spec)
        self.mirror = None if ctx.run_url is None else RunMirror(
            ctx.run_dir, ctx.run_url, rank=ctx.rank, local_rank=ctx.local_rank, world_size=ctx.world_size,
            local_world_size=ctx.local_world_size, retries=cfg.run.store_retries)
        self.log = RunLogger(ctx.run_dir, rank=ctx.rank, device=ctx.device, group=self.group,
                             loggers=cfg.run.loggers)
        self.validator = Validator(cfg.eval, data, rank=ctx.rank, world_size=ctx.world_size, group=self.group,
                                   device=ctx.device, mean=model.mean, std=model.std,
                                   steps_per_epoch=self.steps_per_epoch, run_dir=ctx.run_dir)
        # Watches the first steps of a fresh run only (a resumed run is past them); its
        # thresholds are RS@k's (a loss in [0, 1]), so baselines are not checked.
        self.saturation = (SaturationCheck(cfg.loss.saturation_steps, self.layout.global_batch)
                           if cfg.loss.saturation != "off" and cfg.loss.name == "rsk" else None)
        self.step = 0
        self._nonfinite_streak = 0
        self._sigterm = False

    # ----------------------------------------------------------------- the algorithm
    def train(self) -> dict:
        cfg = self.cfg
        # SIGTERM (preemption, the launcher shutting down) is acted on at the next step
        # boundary, on every rank together: the last completed step is saved, then we stop.
        signal.signal(signal.SIGTERM, self._on_sigterm)
        self.resume()
        self._open_run_folder()
        if cfg.eval.at_start and self.step == 0 and self.validator.enabled:
            self.evaluate()  # the untrained model's numbers, the baseline of every plot
        batches = _endless(self.train_stream)
        t_start, first_step = time.perf_counter(), self.step
        last = {}
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            images, labels = next(batches)  # stay in host memory; the step moves one chunk at a time
            t_data = time.perf_counter() - t0
            result = self.train_step(images, labels)
            self._check_nonfinite(result)
            if self.step % cfg.run.log_every == 0 or self.step == self.total_steps:
                last = self._log_step(result, time.perf_counter() - t0, t_data, t_start, first_step)
            self._check_saturation(result)  # after the step's record, so the log shows what it saw
            if self.validator.due(self.step, self.total_steps):
                self.evaluate()
            if cfg.run.save_every and self.step % cfg.run.save_every == 0 and self.step < self.total_steps:
                self.save()
            if self._preempted():
                self.save()
                self.log.close(None)  # the tracked runs end as killed; a resume continues them
                self.finish_uploads()
                raise Preempted(f"stopped by SIGTERM after step {self.step}; saved checkpoints/{step_tag(self.step)}. "
                                f"Rerun the same command to resume from it")
        final = self.evaluate() if self.validator.enabled else None
        self.save()
        best = self.validator.best
        summary = {"step": self.step, "last": last, "final_eval": final,
                   "bad_samples": last.get("bad_samples", 0),
                   "best": None if best.best_step is None else best.state_dict()}
        self.log.close(summary)
        self.finish_uploads()
        return summary

    def train_step(self, images: torch.Tensor, labels: torch.Tensor):
        """One optimizer step (rskdist/parallel/step.py); the step count, the LR schedule,
        the data position and every seed advance together, applied update or not."""
        cfg, ctx = self.cfg, self.ctx
        loss_fn = StepLoss(self.criterion, seed=cfg.run.seed, step=self.step, group=self.group,
                           params_from=self.loss_params_from)
        result = two_pass_step(
            self.engine, images, labels, loss_fn=loss_fn, chunk_size=self.layout.chunk_size,
            step=self.step, seed=cfg.run.seed,
            input_dtype=self.input_dtype, device=ctx.device, group=self.group, loss_params=loss_fn.param_leaves,
        )
        if self.ema is not None and result.step_applied:
            self.ema.update()
        if not result.step_applied:
            # DeepSpeed skips the scheduler with an fp16 overflow-skipped update; the schedule
            # follows the trainer's step (batches consumed), like data position and seeds.
            with warnings.catch_warnings():
                # torch warns when the very first update was the skipped one; that is intended.
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                self.scheduler.step()
        self.step += 1
        return result

    def evaluate(self) -> dict:
        """Every rank evaluates; a new best is saved and named by checkpoints/best."""
        metrics = self.validator.evaluate(self.engine, self.input_dtype, ema=self.ema)
        is_best = self.validator.is_new_best(self.step, metrics)
        if is_best and self.cfg.eval.save_best and self.step > 0:  # step 0 is the seed's untrained model
            self.save()
            self.checkpoints.mark_best(step_tag(self.step))
            if self.mirror is not None:
                self.mirror.marked_best(step_tag(self.step))
        self.log.evaluation(self.step, self._epoch(), metrics, is_best=is_best)
        return metrics

    # ----------------------------------------------------------------- checkpoints
    def save(self) -> None:
        """Every rank saves the current step (once per step); see rskdist/checkpoint.py."""
        if self.checkpoints.last_saved_step == self.step:
            return
        state = {"step": self.step, "data": self.train_stream.state_dict(),
                 "best": self.validator.best.state_dict(), "layout": self.layout.record()}
        tag = self.checkpoints.save(self.step, {"trainer": state}, rank_files=self._ema_files())
        if self.mirror is not None:
            self.mirror.saved(tag)  # uploaded in the background; the step does not wait

    def resume(self) -> bool:
        if self.mirror is not None and self.cfg.run.resume == "auto":
            self.mirror.restore()  # fresh nodes: the store's latest checkpoint, downloaded
            self._barrier()
        loaded = self.checkpoints.resume(self.cfg.run.resume)
        if loaded is None:
            return False
        load_path, client = loaded
        state = client["trainer"]
        saved_layout = self._saved_layout(state)
        if saved_layout.global_batch != self.layout.global_batch:
            raise ValueError(f"resume: {self.checkpoints.resumed_from} was trained with data.global_batch="
                             f"{saved_layout.global_batch}, the config says {self.layout.global_batch}: the run "
                             f"would not see its batches; resume with data.global_batch={saved_layout.global_batch} "
                             f"(any world size that divides it), or start a new run")
        self.step = int(state["step"])
        if self.step > 0:
            self.saturation = None  # the check watches a run's first steps
        self.train_stream.load_state_dict(state["data"])
        if self.ema is not None:
            self._load_ema(self.checkpoints.resumed_from, saved_layout.world_size)
        if state.get("best"):
            self.validator.best.load_state_dict(state["best"])
        self.log.say(f"resumed from {load_path} at step {self.step}")
        change = world_change(saved_layout, self.layout, zero_stage=self.cfg.deepspeed.zero_stage)
        if change:
            self.log.say(change)
        return True

    def finish_uploads(self) -> None:
        """Wait (run.upload_wait_minutes at most) for the run folder's uploads to the store;
        what is still missing ends the job with an error that lists it."""
        if self.mirror is None:
            return
        missing = self.mirror.finish(60 * self.cfg.run.upload_wait_minutes)
        if missing:
            raise ValueError(f"the run folder on {self.ctx.run_url} is behind its staging copy {self.ctx.run_dir} "
                             f"(rank {self.ctx.rank}): " + "; ".join(missing) + ". Everything is in the staging "
                             "folder; rerun the same command on this node to upload it")

    def _saved_layout(self, state: dict) -> BatchLayout:
        """The layout a checkpoint was saved with; for one saved before the record, what the
        checkpoint's files say (the world size) and the config (the rest)."""
        if "layout" in state:
            return BatchLayout.from_record(state["layout"], m=self.layout.m)
        world = self.checkpoints.saved_world_size or state["data"].get("world_size", self.ctx.world_size)
        return BatchLayout(global_batch=self.layout.global_batch, world_size=world, m=self.layout.m,
                           chunk_size=self.layout.chunk_size)

    # ----------------------------------------------------------------- records
    def _open_run_folder(self) -> None:
        info = {"world_size": self.ctx.world_size, "model": self.model_info,
                "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps}
        self.log.open(self.cfg, info, fresh=self.step == 0, model_spec=self.model_spec)
        self._barrier()
        cfg = self.cfg
        self.log.say(f"rskdist: {self.model_info}")
        self.log.say(f"rskdist: world {self.ctx.world_size} | {self.layout.describe()} | "
                     f"ZeRO-{cfg.deepspeed.zero_stage} "
                     f"{cfg.deepspeed.precision} | {self.total_steps} steps ({self.steps_per_epoch}/epoch) | "
                     f"run {self.ctx.run_dir}")
        self.log.say("rskdist: parameter groups (optim.layer_decay, optim.head_lr_multiplier, model.freeze_*):\n"
                     + "\n".join(self.param_groups))
        if self.frozen_steps:
            self.log.say(f"rskdist: backbone frozen (LR 0) for steps 0-{self.frozen_steps - 1}: only the head"
                         f"{' and the loss proxies' if self.loss_params_from is not None else ''} learn "
                         f"(loss.backbone_warmup_epochs; -1 is the loss's paper default)")

    def _log_step(self, result, step_seconds: float, data_seconds: float, t_start: float, first_step: int) -> dict:
        elapsed = time.perf_counter() - t_start
        eta = elapsed / max(self.step - first_step, 1) * (self.total_steps - self.step)
        record = {
            "step": self.step, "epoch": self._epoch(), "kind": "train",
            "loss": result.loss, "emb_grad_norm": result.emb_grad_norm, "lr": self._base_lr(),
            "skipped_steps": int(self.engine.skipped_steps),  # fp16 overflows: batches without an update
            "images_per_s": round(self.layout.global_batch / step_seconds, 2),
            "step_seconds": round(step_seconds, 3), "data_seconds": round(data_seconds, 3),
            "embed_seconds": round(result.embed_seconds, 3), "loss_seconds": round(result.loss_seconds, 3),
            "backprop_seconds": round(result.backprop_seconds, 3),
        }
        # Shard loaders replace unreadable images and count them (docs/data.md); the synthetic stream has none.
        return self.log.train_step(record, total_steps=self.total_steps, eta_seconds=eta,
                                   bad_samples=getattr(self.train_stream, "bad_samples", 0))

    def _check_saturation(self, result) -> None:
        """Warn about (or stop) a run whose loss cannot learn (rskdist/loss/saturation.py)."""
        verdict = None if self.saturation is None else self.saturation.update(result.loss, result.emb_grad_norm)
        if verdict is None:
            return
        if self.cfg.loss.saturation == "stop":
            self.log.record({"step": self.step, "kind": "warning", "saturated": True, "message": verdict})
            # Every rank holds the same all-reduced loss and norm, hence the same verdict.
            raise ValueError(f"{verdict}. Stopped (loss.saturation=stop; loss.saturation=warn trains on)")
        self.log.warn(self.step, verdict, saturated=True)

    def _check_nonfinite(self, result) -> None:
        """run.nonfinite: every rank saw the same all-reduced flags, so every rank acts alike."""
        if not result.nonfinite_ranks:
            self._nonfinite_streak = 0
            return
        self._nonfinite_streak += 1
        run = self.cfg.run
        what = (f"step {self.step}: non-finite {result.nonfinite_stage} (first seen on rank "
                f"{', '.join(map(str, result.nonfinite_ranks))})")
        fields = {"nonfinite": True, "stage": result.nonfinite_stage, "ranks": list(result.nonfinite_ranks),
                  "consecutive": self._nonfinite_streak}
        hint = "lower optim.lr, set optim.grad_clip, check the data; the last checkpoint is intact"
        stop = None
        if run.nonfinite == "stop":
            stop = f"{what}; stopped without saving (run.nonfinite=stop): {hint}"
        elif self._nonfinite_streak > run.nonfinite_max_skips:
            stop = (f"{what}; {self._nonfinite_streak} steps in a row, more than run.nonfinite_max_skips="
                    f"{run.nonfinite_max_skips}: stopped without saving: {hint}")
        if stop:
            self.log.record({"step": self.step, "kind": "warning", **fields, "message": stop})
            raise ValueError(stop)
        self.log.warn(self.step, f"{what}: update skipped on every rank (run.nonfinite=skip)", **fields)

    def _on_sigterm(self, signum, frame) -> None:
        self._sigterm = True

    def _preempted(self) -> bool:
        """Did any rank get SIGTERM? (a one-element all-reduce per step, so all ranks agree)"""
        flag = torch.tensor([int(self._sigterm)], device=self.ctx.device)
        if self.group is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())

    def _ema_file(self) -> str:
        """Under ZeRO-3 each rank averages its own partitions; otherwise every rank holds the
        same whole average and rank 0 writes it."""
        return f"ema_rank{self.ctx.rank}.pt" if self.cfg.deepspeed.zero_stage == 3 else "ema.pt"

    def _ema_files(self) -> dict:
        if self.ema is None or (self.cfg.deepspeed.zero_stage != 3 and self.ctx.rank != 0):
            return {}
        return {self._ema_file(): self.ema.state_dict()}

    def _load_ema(self, folder, saved_world: int) -> None:
        recut = self.cfg.deepspeed.zero_stage == 3 and saved_world != self.ctx.world_size
        path = folder / ("ema_rank0.pt" if recut else self._ema_file())
        if not path.is_file():
            self.log.say(f"resume: {folder} has no weight average ({path.name}; optim.ema_decay was off when it "
                         f"was saved): the average starts from the resumed weights")
        elif recut:  # every saved rank's partitions, re-cut for this world size
            states = [torch.load(folder / f"ema_rank{r}.pt", map_location=self.ctx.device, weights_only=True)
                      for r in range(saved_world)]
            self.ema.load_resharded(states, rank=self.ctx.rank, world_size=self.ctx.world_size)
        else:
            self.ema.load_state_dict(torch.load(path, map_location=self.ctx.device, weights_only=True))

    def _base_lr(self) -> float:
        """optim.lr under the schedule now: the model's (or head's) group LR over its scale,
        whatever layer decay, head multiplier or frozen warm-up do to the other groups."""
        groups, lrs = self.scheduler.optimizer.param_groups, self.scheduler.get_last_lr()
        for g, lr in zip(groups, lrs):
            if g.get("role", "model") in ("model", "head"):
                return lr / g.get("lr_scale", 1.0)
        return lrs[0]

    def _epoch(self) -> float:
        return round(self.step / self.steps_per_epoch, 3)

    def _barrier(self) -> None:
        if self.group is not None:
            dist.barrier(group=self.group)


class Preempted(Exception):
    """The run stopped on SIGTERM after saving its last completed step."""

    exit_code = 143  # 128 + SIGTERM, what schedulers expect of a terminated job


def _endless(stream):
    """Shard loaders iterate one epoch at a time (resuming mid-epoch); chain epochs."""
    while True:
        yield from stream
