"""Evaluation during training: when, on what, and which result is the best so far.

Each evaluation covers every held-out split of the run (rskdist.eval.evaluated_splits):
the validation classes when data.val_classes is set, then each of data.test_splits, every
metric named after its split (rskdist.eval.split_metric). The first split picks `best`.
Every rank embeds its share of a split and ranks its share of the queries
(rskdist.eval.evaluate_model; above eval.shard_above images each rank keeps only its
shard), so no rank waits in a collective while another searches alone; every rank gets
the same metrics and keeps the same best-tracker. Rank 0 writes RUN/examples.html (the
first split's retrievals as pictures) after the split's collectives. Rank 0's verdict
on a new best is broadcast so that every rank takes part in saving it.
"""

from __future__ import annotations

import time

import torch

from rskdist.build import RunData
from rskdist.comm import broadcast_flag
from rskdist.eval import (
    EMA_PREFIX,
    BestTracker,
    default_ks,
    evaluate_model,
    split_metric,
    write_examples,
)
from rskdist.parallel.step_parts import CastInputs


class Validator:
    """Takes the config's eval section (`eval_cfg`) and the run's data (rskdist/build.py
    `RunData`: its held-out splits, the dataset's default k list, the streams)."""

    def __init__(self, eval_cfg, data: RunData, *, rank: int, world_size: int, group, device: torch.device, mean,
                 std, steps_per_epoch: int, run_dir=None):
        self.cfg, self.data = eval_cfg, data
        self.rank, self.world_size, self.group, self.device = rank, world_size, group, device
        self.run_dir = run_dir  # examples.html goes here (None: not written)
        self.mean, self.std = tuple(mean), tuple(std)
        self.ks = tuple(eval_cfg.ks) or default_ks(data.cfg.dataset)
        every = eval_cfg.every_epochs
        self.enabled = every >= 0  # -1: never; 0: only at the end
        self.every_steps = 0 if every <= 0 else max(1, round(every * steps_per_epoch))
        self.splits = data.eval_splits
        best, ema = eval_cfg.best_metric, eval_cfg.best_metric.startswith(EMA_PREFIX)
        best = split_metric(self.splits[0], best[len(EMA_PREFIX):] if ema else best)
        self.best = BestTracker(metric=EMA_PREFIX + best if ema else best)

    def due(self, step: int, total_steps: int) -> bool:
        """An evaluation between steps (the final one is the trainer's to call)."""
        return bool(self.every_steps) and step % self.every_steps == 0 and step < total_steps

    def evaluate(self, engine, input_dtype: torch.dtype, ema=None) -> dict:
        """The metrics of every split, named by split_metric, and eval_seconds (all splits);
        with a weight average (rskdist/parallel/ema.py) the same again for the averaged
        weights, prefixed "ema/"."""
        t0 = time.perf_counter()
        metrics = self._evaluate_splits(engine, input_dtype, pictures=True)
        if ema is not None:
            with ema.swapped():
                metrics.update({f"{EMA_PREFIX}{k}": v for k, v in self._evaluate_splits(engine, input_dtype).items()})
        metrics["eval_seconds"] = round(time.perf_counter() - t0, 2)
        return metrics

    def _evaluate_splits(self, engine, input_dtype: torch.dtype, pictures: bool = False) -> dict:
        metrics = {}
        for split in self.splits:
            stream = self.data.eval_stream(split, batch_size=self.cfg.batch_size,
                                           synthetic_size=self.cfg.synthetic_size, rank=self.rank,
                                           world_size=self.world_size, mean=self.mean, std=self.std)
            # The first split's retrievals as pictures (the one that picks `best`).
            count = self.cfg.examples if pictures and split == self.splits[0] and self.run_dir else 0
            try:
                result = evaluate_model(CastInputs(engine, input_dtype), stream, device=self.device, group=self.group,
                                        ks=self.ks, shard_above=self.cfg.shard_above, examples=count)
                if count:
                    result, examples = result
                    if self.rank == 0:  # rank 0 alone, after the collectives: a few image reads
                        write_examples(self.run_dir, examples, result, stream.read_images,
                                       title=f"{self.run_dir.name}: split {split}")
            finally:
                # Stop its workers now: left to the garbage collector, the stream's worker handles
                # would be inherited by the next workers forked (the training loader's, the next
                # split's), which then fail to shut them down ("can only test a child process").
                stream.close()
            metrics.update({split_metric(split, name): value for name, value in result.items()})
        return metrics

    def is_new_best(self, step: int, metrics: dict) -> bool:
        """Track `metrics` (every rank holds the same ones, so every tracker agrees); rank 0's
        verdict is broadcast all the same, since a split decision would hang the save."""
        return broadcast_flag(self.best.update(step, metrics), self.group, self.device)
