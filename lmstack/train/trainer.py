"""The training loop, composed of parts that each own their state:

    RunLayout      ranks, data/sequence-parallel split, batch arithmetic   (layout.py, resolved first)
    DataSource     the stateful training reader, validation batches        (data.py)
    LM             the model, checkpointing/compile applied                 (build.py)
    Engine         DeepSpeed, backward, the guarded optimizer step          (engine.py)
    TrainState     step, iteration, tokens, skips in a row                  (state.py, + RNGState)
    Checkpointer   atomic saves, resume                                     (checkpoint.py)
    RunLogger, MetricsWindow   metrics.jsonl / TensorBoard records          (metrics.py)
    TrainHooks     named points where tests inject faults                   (faults.py)
    StopRequest, RunDirLock   stop signals; one writer per run directory    (stop.py, run_dir.py; held by `train`)

`Trainer(...)` builds them in that order (every mistake a user can make is reported before a process
group or a model exists) and `Trainer.run` is the loop. The caller's config is never changed: the
trainer's `config` is the resolved one (the data's token ids recorded), which it saves.
"""

from __future__ import annotations

import contextlib
import math
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from lmstack.checkpoint import CONFIG_FILE, complete_tags
from lmstack.config import dump_config
from lmstack.config.schema import RunConfig
from lmstack.errors import LMStackError
from lmstack.model import BatchContext
from lmstack.model.loss import IGNORE_INDEX, fused_linear_next_token_loss_sum, next_token_loss_sum
from lmstack.parallel import build_layout
from lmstack.train import distributed
from lmstack.train.build import aux_loss_weights, build_model
from lmstack.train.checkpoint import Checkpointer, resolve_resume
from lmstack.train.data import build_data, check_train_folders, prepared_source, with_data_token_ids
from lmstack.train.engine import Engine, zero_stage_for
from lmstack.train.faults import TrainHooks, hooks_from_env
from lmstack.train.layout import RunLayout
from lmstack.train.metrics import MetricsWindow, RunLogger, memory_stats, peak_flops
from lmstack.train.optim import lr_at
from lmstack.train.run_dir import RunDirLock
from lmstack.train.state import RNGState, TrainState, seed_all
from lmstack.train.stop import StopRequest, write_stop_record


class TrainingError(LMStackError):
    """Training cannot go on (e.g. too many non-finite losses); the last checkpoint is intact."""


class Trainer:
    def __init__(
        self,
        config: RunConfig,
        resume: str | None = None,
        source_factory=prepared_source,
        hooks: TrainHooks | None = None,
        stop: StopRequest | None = None,
    ) -> None:
        t = config.train
        self.hooks = hooks or TrainHooks()
        self.stop = stop or StopRequest([])
        # Mistakes a user can make are reported before any process group or model is built.
        self.layout = RunLayout.resolve(config)
        self.run_dir = Path(t.run_dir)
        self.checkpointer = Checkpointer(
            self.run_dir, t.keep_last, self.layout.is_main, self.hooks.before_publish
        )
        self.resume_dir = resolve_resume(resume, self.checkpointer.dir)
        if source_factory is prepared_source:
            check_train_folders(config)

        self.dist = distributed.init_distributed(t.dist_timeout_s)
        self.device = self.dist.device
        if self.dist.world_size != self.layout.world:
            raise LMStackError(
                f"WORLD_SIZE={self.layout.world} but the process group has {self.dist.world_size} ranks"
            )
        # Data-parallel replicas read different rows; the ranks of a sequence group the same rows,
        # each keeping its slice (lmstack.parallel).
        self.groups = build_layout(
            self.dist.rank, self.layout.world, self.layout.sp_size, timedelta(seconds=t.dist_timeout_s)
        )
        self.data = build_data(config, self.groups, self.layout.micro_batch, source_factory)
        self.config = with_data_token_ids(config, self.data)
        self.bf16 = self.device.type == "cuda" if t.precision == "auto" else t.precision == "bf16"
        self.zero_stage = zero_stage_for(t.zero_stage, self.bf16)
        self._build_engine()
        self.peak = peak_flops(self.device, self.bf16, t.peak_flops)
        self.state = TrainState()
        self.last_tag: str | None = None
        self.saved_iteration = 0  # the iteration whose state the last save holds (0: nothing to save)
        self.stopped_by: str | None = None  # the stop signal the ranks agreed on

    def _build_engine(self) -> None:
        """The model (its facts for the logs), then, when resuming, the checked checkpoint, then the
        engine: a checkpoint saved with another number of ranks is converted before DeepSpeed starts."""
        model = build_model(self.config, self.device)
        self.flops_per_token = model.flops_per_token(self.layout.seq_len)
        self.aux_weights = aux_loss_weights(model, self.config.train)
        self.n_params = model.num_params(non_embedding=False)
        self.load_dir, universal = None, False
        if self.resume_dir is not None:
            self.load_dir, universal = self.checkpointer.prepare_resume(
                self.resume_dir, self.config, self.layout.world, self.zero_stage, self.bf16
            )
        self.engine = Engine(model, self.config, self.layout, self.bf16, universal)
        self.universal = universal

    # -- checkpoints ------------------------------------------------------------------------------
    def _per_rank_components(self) -> dict[str, Any]:
        """The components whose state differs between ranks (every rank's is saved)."""
        return {"reader": self.data.train, "rng": RNGState}

    def save(self) -> None:
        per_rank = {
            name: distributed.all_gather_object(part.state_dict())
            for name, part in self._per_rank_components().items()
        }
        client_state = {"lmstack": {**self.state.state_dict(), "world_size": self.layout.world, **per_rank}}
        self.last_tag = self.checkpointer.save(
            self.engine.ds, self.state.step, client_state, dump_config(self.config), self.data.tokenizer_dir
        )
        self.saved_iteration = self.state.iteration

    def _load(self) -> None:
        saved = self.checkpointer.load(self.engine.ds, self.load_dir, self.universal)
        self.state.load_state_dict(saved)
        if saved["world_size"] == self.layout.world:
            for name, part in self._per_rank_components().items():
                part.load_state_dict(saved[name][self.layout.rank])
        else:
            # Another number of ranks: the reader re-splits what all ranks had consumed (see
            # lmstack.data); RNG streams cannot be mapped, so each rank reseeds from (seed, step, rank).
            self.data.train.load_state_dict(saved["reader"][0])
            seed_all(self.config.train.seed + 1_000_003 * self.state.step + self.layout.rank)
        self.last_tag = self.resume_dir.name
        self.saved_iteration = self.state.iteration

    # -- steps -----------------------------------------------------------------------------------
    def _forward_loss(
        self, batch: Any, aux_sums: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sum of token losses, number of labelled tokens, weighted auxiliary loss) of one micro-batch.

        The batch context is built here, on the host, once per micro-batch; every aux value is
        accumulated (detached) into `aux_sums` for the step's metrics."""
        ids = batch.input_ids.to(self.device, non_blocking=True)
        labels = batch.labels.to(self.device, non_blocking=True)
        context = BatchContext.from_doc_ids(batch.doc_ids, self.device, offsets=batch.doc_offsets)
        context.sequence_parallel = self.groups.sequence
        # ZeRO-3 partitions the head weight outside the head's own forward: plain path there.
        fused = self.config.train.fused_loss and self.zero_stage < 3
        out = self.engine(ids, context, return_hidden=fused)
        if fused:
            head = self.engine.module.lm_head.weight
            loss_sum, n_labelled = fused_linear_next_token_loss_sum(out.logits, head, labels)
        else:
            loss_sum, n_labelled = next_token_loss_sum(out.logits, labels)
        aux_loss = torch.zeros((), device=self.device)
        for key, value in out.aux.items():
            name = key.split("/")[0]
            if name in self.aux_weights:
                aux_loss = aux_loss + self.aux_weights[name] * value.float()
            aux_sums[key] = aux_sums.get(key, 0.0) + value.detach().float()
        return loss_sum, n_labelled, aux_loss

    def _step_token_count(self, batches: list[Any]) -> torch.Tensor:
        """Labelled tokens of the whole optimizer step: every micro-batch on every rank (float64)."""
        import torch.distributed as dist

        count = torch.stack([(b.labels != IGNORE_INDEX).sum() for b in batches]).sum().double()
        count = count.to(self.device)
        dist.all_reduce(count)
        return count

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over grad_accum micro-batches. Returns its metrics; `skipped`: the global
        gradient norm was not finite, so nothing was updated (weights, optimizer moments and its step
        count, `state.step` and with it the LR schedule), while the data moved on."""
        import torch.distributed as dist

        t0, c0 = time.perf_counter(), time.process_time()
        layout, state, sp = self.layout, self.state, self.groups.sequence
        state.iteration += 1
        lr = lr_at(state.step, self.config.train, layout.total_steps)
        self.engine.set_lr(lr)
        batches = [next(self.data.train) for _ in range(layout.grad_accum)]
        # The LM loss is the mean over the labelled tokens of the whole step, however they fall on
        # micro-batches and ranks. DeepSpeed divides each backward by grad_accum and averages gradients
        # over ranks, so each micro-batch's loss sum is scaled by grad_accum x world / global count
        # (auxiliary losses, already means, are averaged over micro-batches and ranks as they are).
        # With sequence parallelism each rank's batch is one slice of its group's rows: the global
        # count counts every token once, so the scale needs no sequence-parallel factor.
        n_tokens = self._step_token_count(batches)
        scale = layout.grad_accum * layout.world / n_tokens.clamp_min(1)
        loss_total = torch.zeros((), device=self.device, dtype=torch.float64)
        aux_sums: dict[str, torch.Tensor] = {}
        if sp is not None:
            sp.take_bytes()  # count this step's communication only
        for micro, batch in enumerate(batches):
            loss_sum, _, aux_loss = self._forward_loss(batch, aux_sums)
            loss_sum = self.hooks.micro_batch_loss(loss_sum, state.iteration)
            self.engine.backward(
                loss_sum * scale.to(loss_sum.dtype) + aux_loss, micro == layout.grad_accum - 1
            )
            loss_total += loss_sum.detach().double()
        dist.all_reduce(loss_total)
        applied, grad_norm = self.engine.step()
        if applied:
            state.step, state.nan_skips = state.step + 1, 0
        else:
            state.nan_skips += 1
        state.tokens += layout.tokens_per_step
        comm = sp.take_bytes() if sp is not None else {}
        return {
            **self._aux_metrics(aux_sums, layout.grad_accum * layout.world),
            "loss": (loss_total / n_tokens.clamp_min(1)).item(),
            **{f"comm/sp_bytes/layer{i}": b for i, b in sorted(comm.items())},
            "lr": lr,
            "grad_norm": grad_norm,
            "skipped": not applied,
            "time": time.perf_counter() - t0,
            "cpu_time": time.process_time() - c0,
        }

    def _aux_metrics(self, aux_sums: dict[str, torch.Tensor], n_micro: int) -> dict[str, float]:
        """The step's mean aux values over all micro-batches and ranks, as `aux/<name>/layer<i>`, and
        for each auxiliary loss its sum over layers as `aux/<name>` (what the loss adds, unweighted)."""
        import torch.distributed as dist

        if not aux_sums:
            return {}
        keys = sorted(aux_sums)
        values = torch.stack([aux_sums[k] for k in keys])
        dist.all_reduce(values)
        means = dict(zip(keys, (values / n_micro).tolist()))
        metrics = {f"aux/{k}": v for k, v in means.items()}
        for name in self.aux_weights:
            metrics[f"aux/{name}"] = sum(v for k, v in means.items() if k.split("/")[0] == name)
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float] | None:
        """Loss and perplexity on the data folder's own validation split (`val_loss`, `val_ppl`) and on
        every named `data.val_path` folder and `data.mixture` source's val split (`val/<name>/loss`,
        `val/<name>/ppl`); None: nothing to do."""
        if (self.data.val is None and not self.data.named_val) or self.config.train.eval_batches == 0:
            return None
        self.engine.eval()
        out = {}
        if self.data.val is not None:
            loss = self._eval_loss(self.data.val)
            out.update(val_loss=loss, val_ppl=math.exp(min(loss, 50.0)))
        for name, batches in self.data.named_val.items():
            loss = self._eval_loss(batches)
            out.update({f"val/{name}/loss": loss, f"val/{name}/ppl": math.exp(min(loss, 50.0))})
        self.engine.train()
        return out

    def _eval_loss(self, batches) -> float:
        """Mean next-token loss over eval_batches micro-batches of `batches()` (all ranks together)."""
        import torch.distributed as dist

        n_batches = self.config.train.eval_batches
        total = torch.zeros(2, device=self.device, dtype=torch.float64)
        source = batches()
        it = iter(source)
        # eval_batches micro-batches in all, split over the ranks; null: the whole split once (the
        # validation reader gives every rank the same number of batches).
        per_rank = -(-(n_batches or 16) // self.groups.dp_size)
        if n_batches is None:
            with contextlib.suppress(TypeError):  # a split without a length: the default count
                per_rank = len(source)
        for _ in range(per_rank):
            try:
                batch = next(it)
            except StopIteration:  # a small validation split: start it over (same count on all ranks)
                it = iter(batches())
                batch = next(it)
            loss_sum, n, _ = self._forward_loss(batch, {})
            total += torch.stack([loss_sum.double(), n.double()])
        dist.all_reduce(total)
        return (total[0] / total[1]).item()

    # -- the run ---------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train from the resumed (or first) step to the last, or until a stop signal (then save);
        returns the summary of the last step."""
        t = self.config.train
        if self.load_dir is not None:
            self._load()
        window, last = MetricsWindow(), {}
        with self._start_logs() as logger, self._progress_bar() as bar:
            # Agreed before every step and after the last: a signal during the last step still ends
            # in a stop record and exit 75 (the launcher's next start then finishes at once).
            while not self._stop_agreed() and self.state.step < self.layout.total_steps:
                m = self.train_step()
                window.add(m, self.layout.tokens_per_step)
                if m["skipped"]:
                    self._on_skip(m, logger, bar)
                    continue
                bar.update(1)
                final = self.state.step == self.layout.total_steps
                if self.state.step % t.log_every == 0 or final:
                    last = self._log_train(m, window, logger, bar)
                if self.state.step % t.eval_every == 0 or final:
                    last.update(self._log_val(logger, bar))
                if self.state.step % t.save_every == 0 or final:
                    self.save()
                self.hooks.after_step(self.state.step)
            if self.stopped_by is not None:
                self._save_on_stop(logger, bar)
        summary = {"step": self.state.step, "tokens": self.state.tokens, "checkpoint": self.last_tag, **last}
        if self.stopped_by is not None:
            summary["stopped_by"] = self.stopped_by
        if self.layout.is_main:
            summary["checkpoints"] = complete_tags(self.checkpointer.dir)
        return summary

    def _stop_agreed(self) -> bool:
        """Collective, before every iteration: has any rank received a stop signal?"""
        self.stopped_by = self.stop.agreed()
        return self.stopped_by is not None

    def _save_on_stop(self, logger: RunLogger, bar) -> None:
        """Save the state the ranks stopped at (unless that very state is saved already), log a `stop`
        record and leave the stop record for the launcher (lmstack.train.stop)."""
        if self.state.iteration != self.saved_iteration:
            self.save()
        tag_dir = str(self.checkpointer.dir / self.last_tag) if self.last_tag else None
        record = {"signal": self.stopped_by, "iteration": self.state.iteration, "checkpoint": tag_dir}
        logger.log("stop", self.state.step, record)
        if self.layout.is_main:
            where = f"checkpoint {self.last_tag}" if self.last_tag else "nothing trained yet, no checkpoint"
            bar.write(
                f"{self.stopped_by}: stopped at step {self.state.step} ({where}); continue with --resume auto"
            )
        write_stop_record({"step": self.state.step, **record})

    def _start_logs(self) -> RunLogger:
        """The run's resolved config.yaml and its logger; a run that starts logs a `run` record."""
        main = self.layout.is_main
        if main:
            (self.run_dir / CONFIG_FILE).write_text(dump_config(self.config))
        logger = RunLogger(self.run_dir, main, self.config.train.tensorboard)
        if main and self.state.step == 0:
            values = {
                "params": self.n_params,
                "flops_per_token": self.flops_per_token,
                "world_size": self.layout.world,
                "sequence_parallel_size": self.layout.sp_size,
                "grad_accum": self.layout.grad_accum,
                "tokens_per_step": self.layout.tokens_per_step,
                "total_steps": self.layout.total_steps,
                "device": str(self.device),
                "precision": "bf16" if self.bf16 else "fp32",
                "zero_stage": self.zero_stage,
                "peak_flops": self.peak,
            }
            logger.log("run", 0, values)
        return logger

    def _progress_bar(self):
        from tqdm.auto import tqdm

        return tqdm(
            total=self.layout.total_steps,
            initial=self.state.step,
            unit="step",
            disable=not (self.layout.is_main and self.config.train.progress_bar),
            dynamic_ncols=True,
            mininterval=1.0,
        )

    def _log_train(self, m: dict[str, Any], window: MetricsWindow, logger: RunLogger, bar) -> dict[str, Any]:
        """The `train` record of this step (throughput over the steps since the last one)."""
        rates = window.take(self.flops_per_token, self.peak, self.layout.world)
        record = {
            "loss": m["loss"],
            "lr": m["lr"],
            "grad_norm": m["grad_norm"],
            "tokens": self.state.tokens,
            **rates,
            **memory_stats(self.device),
            **{k: v for k, v in m.items() if k.startswith(("aux/", "comm/"))},
        }
        if self.data.tokens_per_source is not None:
            record.update({f"data/tokens/{k}": v for k, v in self.data.tokens_per_source().items()})
        logger.log("train", self.state.step, record)
        if self.layout.is_main:
            bar.set_postfix(
                loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}", tok_s=f"{rates['tokens_per_s']:,.0f}"
            )
        return record

    def _log_val(self, logger: RunLogger, bar) -> dict[str, float]:
        val = self.evaluate()
        if val is None:
            return {}
        logger.log("val", self.state.step, val)
        if self.layout.is_main:
            bar.write(f"step {self.state.step}: " + "  ".join(f"{k} {v:.4f}" for k, v in val.items()))
        return val

    def _on_skip(self, m: dict[str, Any], logger: RunLogger, bar) -> None:
        """Log a skipped step (a `skip` record keyed by iteration); too many in a row stop the run."""
        t, state = self.config.train, self.state
        # keyed by iteration; `last_step`: the optimizer steps applied so far
        values = {"last_step": state.step, "grad_norm": m["grad_norm"], "loss": m["loss"]}
        logger.log("skip", state.iteration, values)
        if self.layout.is_main:
            bar.write(
                f"iteration {state.iteration} (step {state.step + 1}): gradient norm {m['grad_norm']}, step "
                f"skipped ({state.nan_skips} in a row, train.max_nan_skips={t.max_nan_skips})"
            )
        if state.nan_skips > t.max_nan_skips:
            where = (
                f"last checkpoint: {self.checkpointer.dir / self.last_tag}"
                if self.last_tag
                else "no checkpoint saved yet"
            )
            raise TrainingError(
                f"the gradient norm was not finite at {state.nan_skips} steps in a row, more than "
                f"train.max_nan_skips={t.max_nan_skips}; stopping at step {state.step} ({where}). Lower train.lr "
                "or check the data"
            )


def train(
    config: RunConfig,
    resume: str | None = None,
    source_factory=prepared_source,
    hooks: TrainHooks | None = None,
) -> dict[str, Any]:
    """Train `config` (see lmstack.train); returns a summary of the final step (with `stopped_by`, the
    signal's name, when a stop signal ended it early: lmstack.train.stop). `hooks`: the loop's hook
    points (default: the faults of `LMSTACK_FAULT`, if set; lmstack.train.faults). While it runs, the
    run directory is locked against a second training (lmstack.train.run_dir)."""
    import torch.distributed as dist

    owns_group = not dist.is_initialized()  # a caller's process group is left as it is
    rank = RunLayout.resolve(config).rank
    with StopRequest(config.train.stop_signals) as stop, RunDirLock(Path(config.train.run_dir), rank):
        try:
            trainer = Trainer(config, resume, source_factory, hooks or hooks_from_env(), stop)
            return trainer.run()
        finally:
            if owns_group:
                distributed.destroy()
