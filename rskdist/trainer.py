"""The Trainer: builds model, DeepSpeed engine and data from a Config, then trains.

The model is a plain nn.Module (rskdist.models); DeepSpeed (ZeRO, precision,
accumulation) is applied to it here. The step itself is rskdist.parallel.two_pass_step.
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from rskdist.checkpoint import CheckpointManager, step_tag
from rskdist.config import Config
from rskdist.loss import rsk_loss, simix_plan
from rskdist.loss.saturation import SaturationCheck
from rskdist.parallel.gradients import gather_rows
from rskdist.parallel.step import two_pass_step
from rskdist.utils import memory_stats, run_metadata

PRECISION_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Context:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    run_dir: Path


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """A torch.optim optimizer (passing an object keeps DeepSpeed from compiling fused_adam).

    Weight decay applies to every parameter as in the published code, unless
    `optim.decay_norm_and_bias` is off (then biases, norms and token embeddings are exempt).
    """
    from rskdist.models import param_groups

    groups = param_groups(model, cfg.weight_decay, exclude_norm_bias=not cfg.decay_norm_and_bias)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def lr_factor(step: int, *, steps_per_epoch: int, warmup_steps: int, decay_epochs, decay_factor: float) -> float:
    """Linear warm-up, then step decay at the given epochs (the paper's schedule)."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    drops = sum(1 for e in decay_epochs if step >= e * steps_per_epoch)
    return warm * decay_factor**drops


def build_model(cfg: Config, *, pretrained: bool = True) -> torch.nn.Module:
    """The retrieval model of a config (random init when `pretrained` is False)."""
    from rskdist.models import create_model

    m = cfg.model
    return create_model(
        m.backbone, embed_dim=m.embed_dim, pretrained=(m.pretrained or None) if pretrained else None, pool=m.pool,
        gem_p=m.gem_p, image_size=m.image_size, grad_checkpointing=m.grad_checkpointing, freeze_bn=m.freeze_bn,
        drop_path_rate=m.drop_path_rate, backbone_kwargs=m.backbone_kwargs,
    )


def build_eval_stream(cfg: Config, *, rank: int, world_size: int, mean, std):
    """The held-out split of the config's data, every image once over the ranks."""
    d, e = cfg.data, cfg.eval
    if d.source == "synthetic":
        from rskdist.data.synthetic_stream import SyntheticEvalStream

        return SyntheticEvalStream(
            num_train_classes=d.synthetic_classes, size=e.synthetic_size, rank=rank, world_size=world_size,
            batch_size=e.batch_size, image_size=cfg.model.image_size, seed=cfg.run.seed, noise=d.synthetic_noise,
        )
    from rskdist.data import build_eval_loader

    return build_eval_loader(
        d.root, split="test", rank=rank, world_size=world_size, batch_size=e.batch_size,
        image_size=cfg.model.image_size, num_workers=d.num_workers, mean=mean, std=std,
    )


def make_loss_fn(loss_cfg, *, seed: int, step: int, group):
    """loss_fn(local_emb, local_labels) -> RS@k (+ SiMix) loss of the global batch.

    The SiMix plan is drawn from the gathered labels with a generator seeded by
    (seed, step), so every rank builds the same plan without communicating it, and a
    resumed run draws the same plans as an uninterrupted one.
    """

    def loss_fn(emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        mix = None
        if loss_cfg.simix:
            all_labels, _ = gather_rows(labels, group)
            gen = torch.Generator().manual_seed(seed * 7_919 + step)
            pairs, alphas = simix_plan(all_labels.cpu(), per_class=loss_cfg.simix_per_class or None, generator=gen)
            mix = (pairs.to(labels.device), alphas.to(labels.device))
        return rsk_loss(
            emb, labels, ks=loss_cfg.ks, tau1=loss_cfg.tau1, tau2=loss_cfg.tau2, count_self=loss_cfg.count_self,
            mix=mix, block_size=loss_cfg.block_size or None, virtual_queries=loss_cfg.simix_queries, group=group,
        )

    return loss_fn


def deepspeed_config(cfg: Config, *, chunk_size: int, num_chunks: int, world_size: int) -> dict:
    """The DeepSpeed config generated from ours; `deepspeed.extra` is merged last."""
    ds = {
        "train_micro_batch_size_per_gpu": chunk_size,
        # One accumulation step per chunk: the optimizer runs after the last chunk.
        "gradient_accumulation_steps": num_chunks,
        "train_batch_size": chunk_size * num_chunks * world_size,
        "gradient_clipping": cfg.optim.grad_clip,  # explicit: DeepSpeed's default is 1.0
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.deepspeed.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif cfg.deepspeed.precision == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 16}
    _merge(ds, cfg.deepspeed.extra)
    return ds


def _merge(base: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


class Trainer:
    """Owns the engine, the streams and the run folder; `train()` runs to the end."""

    def __init__(self, cfg: Config, ctx: Context):
        import deepspeed

        from rskdist.models import describe

        self.cfg, self.ctx = cfg, ctx
        d = cfg.data
        self.local_batch = d.global_batch // ctx.world_size
        self.classes_per_rank = self.local_batch // d.m
        self.num_chunks = math.ceil(self.local_batch / d.chunk_size)
        self.input_dtype = PRECISION_DTYPE[cfg.deepspeed.precision]

        torch.manual_seed(cfg.run.seed)  # same initial weights on every rank
        model = build_model(cfg)
        self.model_info = describe(model)
        self.mean, self.std = tuple(model.mean), tuple(model.std)
        self.train_stream = self._build_train_stream()
        self.steps_per_epoch = self.train_stream.steps_per_epoch
        self.total_steps = cfg.run.max_steps or max(1, round(cfg.run.epochs * self.steps_per_epoch))

        optimizer = build_optimizer(model, cfg.optim)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s: lr_factor(s, steps_per_epoch=self.steps_per_epoch, warmup_steps=cfg.optim.warmup_steps,
                                decay_epochs=cfg.optim.decay_epochs, decay_factor=cfg.optim.decay_factor),
        )
        ds_config = deepspeed_config(cfg, chunk_size=d.chunk_size, num_chunks=self.num_chunks,
                                     world_size=ctx.world_size)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config,
        )
        self._group = dist.group.WORLD if ctx.world_size > 1 else None
        # Watches the first steps of a fresh run only (a resumed run is past them).
        self.saturation = (SaturationCheck(cfg.loss.saturation_steps, d.global_batch)
                           if cfg.loss.saturation != "off" else None)
        self.checkpoints = CheckpointManager(ctx.run_dir / "checkpoints", self.engine, rank=ctx.rank,
                                             keep=cfg.run.keep_checkpoints, barrier=self._barrier)
        self.step = 0
        self.best = None
        self._metrics_file = None
        self._tb = None

    # ----------------------------------------------------------------- data
    def _build_train_stream(self):
        d, ctx = self.cfg.data, self.ctx
        if d.source == "synthetic":
            from rskdist.data.synthetic_stream import SyntheticTrainStream

            return SyntheticTrainStream(
                num_classes=d.synthetic_classes, rank=ctx.rank, world_size=ctx.world_size,
                classes_per_rank=self.classes_per_rank, m=d.m, image_size=self.cfg.model.image_size,
                seed=self.cfg.run.seed, noise=d.synthetic_noise,
            )
        from rskdist.data import build_train_loader

        return build_train_loader(
            d.root, rank=ctx.rank, world_size=ctx.world_size, classes_per_rank=self.classes_per_rank, m=d.m,
            image_size=self.cfg.model.image_size, num_workers=d.num_workers, seed=self.cfg.run.seed,
            mean=self.mean, std=self.std, scale=tuple(d.crop_scale), ratio=tuple(d.crop_ratio), hflip=d.hflip,
            remainder=d.remainder,
            steps_per_epoch=None if d.epoch_length == "auto" else d.epoch_length,
            # On GPUs images travel as uint8 and are normalised on the device.
            **({"device": ctx.device, "pin_memory": True} if ctx.device.type == "cuda" else {}),
        )

    def _build_eval_stream(self):
        return build_eval_stream(self.cfg, rank=self.ctx.rank, world_size=self.ctx.world_size, mean=self.mean,
                                 std=self.std)

    # ----------------------------------------------------------------- run folder
    def _open_run_dir(self) -> None:
        from rskdist.config import save_config

        run_dir = self.ctx.run_dir
        if self.ctx.rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, run_dir / "config.yaml")
            meta = run_metadata(world_size=self.ctx.world_size)
            meta["model"] = self.model_info
            meta["steps_per_epoch"] = self.steps_per_epoch
            meta["total_steps"] = self.total_steps
            (run_dir / "env.json").write_text(json.dumps(meta, indent=2))
            metrics = run_dir / "metrics.jsonl"
            if self.step == 0 and metrics.exists():
                # A fresh start in a used run folder: keep the old records, out of the way.
                metrics.rename(run_dir / f"metrics.before-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
            self._metrics_file = open(metrics, "a")  # a resumed run continues the same file
            if self.cfg.run.tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self._tb = SummaryWriter(str(run_dir / "tb"))
                except ImportError:  # pragma: no cover - tensorboard is a dependency
                    print("warning: tensorboard is not installed; TensorBoard logging is off", flush=True)
        self._barrier()

    def _record(self, record: dict) -> None:
        if self.ctx.rank != 0:
            return
        self._metrics_file.write(json.dumps(record) + "\n")
        self._metrics_file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(key, value, record["step"])

    def _rank0_flag(self, flag: bool) -> bool:
        """Rank 0's decision, on every rank (a one-element broadcast)."""
        if self.ctx.world_size == 1:
            return bool(flag)
        t = torch.tensor([int(flag)], dtype=torch.int64, device=self.ctx.device)  # NCCL needs a GPU tensor
        dist.broadcast(t, src=0, group=self._group)
        return bool(t.item())

    def _barrier(self) -> None:
        if self.ctx.world_size > 1:
            dist.barrier()

    # ----------------------------------------------------------------- checkpoints
    def save(self) -> None:
        """Every rank saves the current step (once per step); see rskdist/checkpoint.py."""
        if self.checkpoints.last_saved_step == self.step:
            return
        state = {"step": self.step, "data": self.train_stream.state_dict(),
                 "best": None if self.best is None else self.best.state_dict()}
        self.checkpoints.save(self.step, {"trainer": state})

    def maybe_resume(self) -> bool:
        loaded = self.checkpoints.resume(self.cfg.run.resume)
        if loaded is None:
            return False
        load_path, client = loaded
        state = client["trainer"]
        self.step = int(state["step"])
        if self.step > 0:
            self.saturation = None  # the check watches a run's first steps
        self.train_stream.load_state_dict(state["data"])
        if state.get("best") and self.best is not None:
            self.best.load_state_dict(state["best"])
        if self.ctx.rank == 0:
            print(f"resumed from {load_path} at step {self.step}", flush=True)
        return True

    # ----------------------------------------------------------------- evaluation
    def evaluate(self) -> dict | None:
        from rskdist.eval import default_ks, embed_dataset, retrieval_metrics

        ctx = self.ctx
        t0 = time.perf_counter()
        emb, labels = embed_dataset(
            _CastInputs(self.engine, self.input_dtype), self._build_eval_stream(), device=ctx.device,
            rank=ctx.rank, world_size=ctx.world_size, group=self._group,
        )
        # Every rank ranks its share of the queries and the sums are all-reduced: no rank
        # waits in a collective while another searches alone, and evaluation is W times
        # faster. Every rank gets the same dict.
        ks = tuple(self.cfg.eval.ks) or default_ks(self.cfg.data.dataset)
        metrics = retrieval_metrics(emb, labels, ks=ks, rank=ctx.rank, world_size=ctx.world_size, group=self._group)
        metrics["eval_seconds"] = round(time.perf_counter() - t0, 2)
        return metrics

    # ----------------------------------------------------------------- loop
    def train(self) -> dict:
        from rskdist.eval import BestTracker

        cfg, ctx = self.cfg, self.ctx
        self.best = BestTracker(metric=cfg.eval.best_metric)
        self.maybe_resume()
        self._open_run_dir()
        if self.ctx.rank == 0:
            print(f"rskdist: {self.model_info}", flush=True)
            print(f"rskdist: world {ctx.world_size} | global batch {cfg.data.global_batch} "
                  f"({self.classes_per_rank * ctx.world_size} classes x {cfg.data.m}) | local {self.local_batch} "
                  f"in {self.num_chunks} chunks | ZeRO-{cfg.deepspeed.zero_stage} {cfg.deepspeed.precision} | "
                  f"{self.total_steps} steps ({self.steps_per_epoch}/epoch) | run {ctx.run_dir}", flush=True)
        eval_every = self._eval_every_steps()
        if cfg.eval.at_start and self.step == 0 and cfg.eval.every_epochs >= 0:
            self._eval_and_track()  # the untrained model's numbers, the baseline of every plot
        batches = _endless(self.train_stream)
        t_start, done_at_start = time.perf_counter(), self.step
        last = {}
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            images, labels = next(batches)  # stay in host memory; the step moves one chunk at a time
            t_data = time.perf_counter() - t0
            result = two_pass_step(
                self.engine, images, labels, loss_fn=make_loss_fn(cfg.loss, seed=cfg.run.seed, step=self.step, group=self._group), chunk_size=cfg.data.chunk_size,
                world_size=ctx.world_size, rank=ctx.rank, step=self.step, seed=cfg.run.seed,
                input_dtype=self.input_dtype, device=ctx.device, group=self._group,
            )
            if not result.step_applied:
                # DeepSpeed skips the scheduler with an fp16 overflow-skipped update; the schedule
                # follows the trainer's step (batches consumed), like data position and seeds.
                with warnings.catch_warnings():
                    # torch warns when the very first update was the skipped one; that is intended.
                    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                    self.scheduler.step()
            self.step += 1
            step_seconds = time.perf_counter() - t0
            if self.step % cfg.run.log_every == 0 or self.step == self.total_steps:
                last = self._log_step(result, step_seconds, t_data, t_start, done_at_start)
            self._check_saturation(result)  # after the step's record, so the log shows what it saw
            if eval_every and self.step % eval_every == 0 and self.step < self.total_steps:
                self._eval_and_track()
            if cfg.run.save_every and self.step % cfg.run.save_every == 0 and self.step < self.total_steps:
                self.save()
        final = self._eval_and_track() if cfg.eval.every_epochs >= 0 else None
        self.save()
        summary = {"step": self.step, "last": last, "final_eval": final,
                   "best": None if self.best.best_step is None else self.best.state_dict()}
        if ctx.rank == 0:
            (ctx.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            if self._metrics_file:
                self._metrics_file.close()
            if self._tb is not None:
                self._tb.close()
        return summary

    def _check_saturation(self, result) -> None:
        """Warn about (or stop) a run whose loss cannot learn (rskdist/loss/saturation.py)."""
        if self.saturation is None:
            return
        verdict = self.saturation.update(result.loss, result.emb_grad_norm)
        if verdict is None:
            return
        self._record({"step": self.step, "kind": "warning", "saturated": True, "message": verdict})
        if self.cfg.loss.saturation == "stop":
            # Every rank holds the same all-reduced loss and norm, hence the same verdict.
            raise ValueError(f"{verdict}. Stopped (loss.saturation=stop; loss.saturation=warn trains on)")
        if self.ctx.rank == 0:
            print(f"warning: {verdict}", file=sys.stderr, flush=True)

    def _eval_every_steps(self) -> int:
        every = self.cfg.eval.every_epochs
        return 0 if every <= 0 else max(1, round(every * self.steps_per_epoch))

    def _eval_and_track(self) -> dict | None:
        metrics = self.evaluate()
        is_best = self._rank0_flag(self.ctx.rank == 0 and metrics is not None and self.best.update(self.step, metrics))
        if is_best and self.cfg.eval.save_best and self.step > 0:  # step 0 is the seed's untrained model
            self.save()
            self.checkpoints.mark_best(step_tag(self.step))
        if self.ctx.rank == 0 and metrics is not None:
            record = {"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 3), "kind": "eval",
                      **{f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}}
            self._record(record)
            table = " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                               if isinstance(v, float) and k != "eval_seconds")
            print(f"eval step {self.step}: {table}{' (best)' if is_best else ''}", flush=True)
        return metrics

    def _log_step(self, result, step_seconds: float, data_seconds: float, t_start: float, done_at_start: int) -> dict:
        ctx = self.ctx
        mem = memory_stats(ctx.device)
        # Every rank's memory, gathered so rank 0 can report the maximum.
        mem_t = torch.tensor([mem.get("rss_peak_mb", 0.0), mem.get("cuda_peak_mb", 0.0)], device=ctx.device)
        if ctx.world_size > 1:
            pieces = [torch.zeros_like(mem_t) for _ in range(ctx.world_size)]
            dist.all_gather(pieces, mem_t)
            per_rank = torch.stack(pieces).cpu()
        else:
            per_rank = mem_t[None].cpu()
        elapsed = time.perf_counter() - t_start
        steps_done = self.step - done_at_start
        eta = elapsed / max(steps_done, 1) * (self.total_steps - self.step)
        record = {
            "step": self.step, "epoch": round(self.step / self.steps_per_epoch, 3), "kind": "train",
            "loss": result.loss, "emb_grad_norm": result.emb_grad_norm, "lr": self.scheduler.get_last_lr()[0],
            "skipped_steps": int(self.engine.skipped_steps),  # fp16 overflows: batches without an update
            "images_per_s": round(self.cfg.data.global_batch / step_seconds, 2),
            "step_seconds": round(step_seconds, 3), "data_seconds": round(data_seconds, 3),
            "pass1_seconds": round(result.pass1_seconds, 3), "loss_seconds": round(result.loss_seconds, 3),
            "pass3_seconds": round(result.pass3_seconds, 3),
            "rss_peak_mb_max": round(float(per_rank[:, 0].max()), 1),
            "rss_peak_mb_per_rank": [round(float(v), 1) for v in per_rank[:, 0]],
        }
        if ctx.device.type == "cuda":
            record["cuda_peak_mb_max"] = round(float(per_rank[:, 1].max()), 1)
        self._record(record)
        if ctx.rank == 0:
            width = len(str(self.total_steps))
            print(f"step {self.step:>{width}}/{self.total_steps} | epoch {record['epoch']:.2f} | loss {result.loss:.4f}"
                  f" | |dL/dE| {result.emb_grad_norm:.2e} | {record['images_per_s']:.1f} img/s | lr {record['lr']:.2e} | "
                  f"mem {record['rss_peak_mb_max']:.0f} MB/rank | eta {_fmt_seconds(eta)}", flush=True)
        return record


def _endless(stream):
    """Shard loaders iterate one epoch at a time (resuming mid-epoch); chain epochs."""
    while True:
        yield from stream


class _CastInputs(torch.nn.Module):
    """Feeds images in the engine's parameter dtype (bf16/fp16 runs)."""

    def __init__(self, inner: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.inner, self.dtype = inner, dtype

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.inner(images.to(self.dtype)).float()


def _fmt_seconds(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"
