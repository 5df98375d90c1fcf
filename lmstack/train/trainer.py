"""The training loop: DeepSpeed engine construction, steps, evaluation, checkpoints and logs."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import random
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lmstack.config import dump_config
from lmstack.config.schema import RunConfig
from lmstack.data.reader import IGNORE_INDEX
from lmstack.errors import LMStackError
from lmstack.model import LM, BatchContext
from lmstack.parallel import build_layout
from lmstack.train import distributed
from lmstack.train.checkpoint import Checkpointer, complete_tags, fault, latest_tag
from lmstack.train.data import DataSource, SequenceSlices, check_prepared, prepared_source
from lmstack.train.metrics import RunLogger, memory_stats, peak_flops
from lmstack.train.optim import build_optimizer, lr_at


class TrainingError(LMStackError):
    """Training cannot go on (e.g. too many non-finite losses); the last checkpoint is intact."""


def batch_layout(global_batch: int, micro_batch: int, grad_accum: int | None, world: int) -> int:
    """Gradient-accumulation steps so that micro_batch x accumulation x world == global batch."""
    if grad_accum is None:
        if global_batch % (micro_batch * world):
            raise LMStackError(
                f"train.global_batch_size={global_batch} is not divisible by train.micro_batch_size="
                f"{micro_batch} x {world} data-parallel ranks; change one of them (or the number of processes)"
            )
        return global_batch // (micro_batch * world)
    if micro_batch * grad_accum * world != global_batch:
        raise LMStackError(
            f"inconsistent batch: train.micro_batch_size={micro_batch} x train.grad_accum={grad_accum} x "
            f"{world} data-parallel ranks = {micro_batch * grad_accum * world}, but "
            f"train.global_batch_size={global_batch}"
        )
    return grad_accum


def _check_run_dir(run_dir: Path, rank: int) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{rank}-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise LMStackError(f"train.run_dir: cannot write to '{run_dir}': {err.strerror or err}") from None


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _use_activation_checkpointing(model: LM) -> None:
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        forward = block.forward

        @functools.wraps(forward)
        def wrapped(x, context, state=None, use_cache=False, _forward=forward):
            if use_cache or not torch.is_grad_enabled():
                return _forward(x, context, state, use_cache)
            # The block's aux losses are outputs of the checkpointed call: counted once, not again
            # when the backward pass recomputes the block.
            return checkpoint(_forward, x, context, state, use_cache, use_reentrant=False)

        block.forward = wrapped


def aux_loss_weights(model: LM, overrides: dict[str, float]) -> dict[str, float]:
    """Coefficient of each auxiliary loss the model's mixers declare: their defaults, overridden by
    `train.aux_loss_weights` (a name no mixer of this model declares is an error)."""
    weights: dict[str, float] = {}
    for block in model.blocks:
        weights.update(type(block.mixer).aux_losses)
    for name, value in overrides.items():
        if name not in weights:
            known = ", ".join(sorted(weights)) or "none"
            raise LMStackError(
                f"train.aux_loss_weights.{name}: no mixer of this model emits that loss; emitted: {known}"
            )
        weights[name] = value
    return weights


def zero_stage_for(stage: int, bf16: bool) -> int:
    """DeepSpeed keeps fp32 master weights and fp32 gradient accumulation for bf16 only in its ZeRO
    optimizers, so bf16 runs asked for stage 0 use stage 1 (the same math; optimizer states sharded)."""
    return max(stage, 1) if bf16 else stage


def deepspeed_config(
    cfg: RunConfig, micro_batch: int, grad_accum: int, world: int, bf16: bool, load_universal: bool = False
) -> dict:
    """DeepSpeed's config; `load_universal`: the resume reads a universal checkpoint (another world size)."""
    t = cfg.train
    stage = zero_stage_for(t.zero_stage, bf16)
    zero: dict[str, Any] = {"stage": stage}
    if stage >= 2:
        zero.update(overlap_comm=torch.cuda.is_available(), contiguous_gradients=True)
    if stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=False)
    ds: dict[str, Any] = {
        "train_batch_size": micro_batch * grad_accum * world,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    if bf16:
        # bf16 weights/activations; fp32 master weights (optimizer) and fp32 gradient accumulation.
        ds["bf16"] = {"enabled": True, "check_grad_overflow": True}
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    if load_universal:
        ds["checkpoint"] = {"load_universal": True}
    return ds


class Trainer:
    def __init__(
        self,
        config: RunConfig,
        resume: str | None = None,
        source_factory=prepared_source,
    ) -> None:
        self.config = config
        t = config.train
        # Mistakes a user can make are reported before any process group or model is built.
        world = int(os.environ.get("WORLD_SIZE", "1"))
        sp_size = config.parallel.sequence_parallel_size
        if world % sp_size:
            raise LMStackError(
                f"parallel.sequence_parallel_size={sp_size} does not divide the {world} ranks (WORLD_SIZE)"
            )
        self.micro_batch = t.micro_batch_size
        self.grad_accum = batch_layout(
            t.global_batch_size, t.micro_batch_size, t.grad_accum, world // sp_size
        )
        self.seq_len = config.data.seq_len
        if self.seq_len > config.model.max_seq_len:
            raise LMStackError(
                f"data.seq_len={self.seq_len} exceeds model.max_seq_len={config.model.max_seq_len}"
            )
        self.tokens_per_step = t.global_batch_size * self.seq_len
        if t.max_tokens is not None:
            self.total_steps = math.ceil(t.max_tokens / self.tokens_per_step)
        else:
            self.total_steps = t.max_steps
        self.run_dir = Path(t.run_dir)
        _check_run_dir(self.run_dir, int(os.environ.get("RANK", "0")))
        self.checkpointer = Checkpointer(self.run_dir, t.keep_last, int(os.environ.get("RANK", "0")) == 0)
        self.resume_tag, self.resume_dir = self._resolve_resume(resume)
        if source_factory is prepared_source:
            check_prepared(Path(config.data.path))

        self.dist = distributed.init_distributed(t.dist_timeout_s)
        self.device = self.dist.device
        if self.dist.world_size != world:
            raise LMStackError(f"WORLD_SIZE={world} but the process group has {self.dist.world_size} ranks")
        # Data-parallel replicas read different rows; the ranks of a sequence group the same rows,
        # each keeping its slice (lmstack.parallel).
        self.layout = build_layout(self.dist.rank, world, sp_size, timedelta(seconds=t.dist_timeout_s))
        self.sp = self.layout.sequence
        self.data: DataSource = source_factory(
            config, self.layout.dp_rank, self.layout.dp_size, self.micro_batch
        )
        if self.sp is not None:
            self.data = SequenceSlices.of_source(self.data, self.sp.rank, self.sp.size)
        if self.data.vocab_size is not None and self.data.vocab_size > config.model.vocab_size:
            raise LMStackError(
                f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's vocabulary "
                f"({self.data.vocab_size}) in {config.data.path}"
            )
        for key, value in (self.data.token_ids or {}).items():
            if getattr(config.model, key) is None:  # the resolved config records the data's ids
                setattr(config.model, key, value)

        if t.precision == "auto":
            self.bf16 = self.device.type == "cuda"
        else:
            self.bf16 = t.precision == "bf16"

        self.zero_stage = zero_stage_for(t.zero_stage, self.bf16)
        _seed_all(t.seed)  # same initial weights on every rank
        model = LM(config.model)
        self.flops_per_token = model.flops_per_token(self.seq_len)
        self.aux_weights = aux_loss_weights(model, t.aux_loss_weights)
        self.aux_sums: dict[str, torch.Tensor] = {}
        self.n_params = model.num_params(non_embedding=False)
        if t.activation_checkpointing:
            _use_activation_checkpointing(model)
        use_compile = t.compile if t.compile is not None else self.device.type == "cuda"
        if use_compile:
            for block in model.blocks:
                block.compile()
        model.to(self.device)

        import deepspeed

        self.load_dir, self.universal = None, False
        if self.resume_tag is not None:
            self.load_dir, self.universal = self.checkpointer.prepare_resume(
                self.resume_dir / self.resume_tag, config, world, self.zero_stage, self.bf16
            )
        optimizer = build_optimizer(model, t)
        ds_config = deepspeed_config(
            config, self.micro_batch, self.grad_accum, world, self.bf16, self.universal
        )
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config, dist_init_required=False
        )
        self.peak = peak_flops(self.device, self.bf16, t.peak_flops)
        self.step = 0  # optimizer updates applied (the LR schedule's clock)
        self.iteration = 0  # steps tried, skipped ones included
        self.tokens = 0
        self.nan_skips = 0  # skipped steps in a row
        self.last_tag: str | None = None

    # -- checkpoints ------------------------------------------------------------------------------
    def _resolve_resume(self, resume: str | None) -> tuple[str | None, Path | None]:
        ckpt_dir = self.checkpointer.dir
        if resume in (None, "none"):
            tag = latest_tag(ckpt_dir) if ckpt_dir.is_dir() else None
            if tag is not None:
                raise LMStackError(
                    f"train.run_dir: '{self.run_dir}' already holds checkpoints (latest: {tag}); pass "
                    f"--resume auto to continue that run, or choose another run_dir"
                )
            return None, None
        if resume == "auto":
            tag = latest_tag(ckpt_dir) if ckpt_dir.is_dir() else None
            return (tag, ckpt_dir) if tag is not None else (None, None)
        path = Path(resume)
        if path.is_dir() and (path / "latest").is_file():
            return latest_tag(path), path
        if path.is_dir() and (path / "checkpoints" / "latest").is_file():
            return latest_tag(path / "checkpoints"), path / "checkpoints"
        if path.is_dir() and path.parent.is_dir():
            return path.name, path.parent
        raise LMStackError(f"--resume: '{resume}' is neither 'auto', a run directory nor a checkpoint folder")

    def _client_state(self) -> dict[str, Any]:
        readers = distributed.all_gather_object(self.data.train.state_dict())
        rngs = distributed.all_gather_object(_rng_state())
        return {
            "lmstack": {
                "step": self.step,
                "iteration": self.iteration,
                "tokens": self.tokens,
                "nan_skips": self.nan_skips,
                "world_size": self.dist.world_size,
                "reader": readers,
                "rng": rngs,
            }
        }

    def save(self) -> None:
        tok_dir = self.data.tokenizer_dir
        self.last_tag = self.checkpointer.save(
            self.engine, self.step, self._client_state(), dump_config(self.config), tok_dir
        )

    def _load(self) -> None:
        state = self.checkpointer.load(self.engine, self.load_dir, self.universal)
        self.step, self.tokens, self.nan_skips = state["step"], state["tokens"], state["nan_skips"]
        self.iteration = state.get("iteration", self.step)
        rank, world = self.dist.rank, self.dist.world_size
        if state["world_size"] == world:
            self.data.train.load_state_dict(state["reader"][rank])
            _set_rng_state(state["rng"][rank])
        else:
            # Another number of ranks: the reader re-splits what all ranks had consumed (see
            # lmstack.data); RNG streams cannot be mapped, so each rank reseeds from (seed, step, rank).
            self.data.train.load_state_dict(state["reader"][0])
            _seed_all(self.config.train.seed + 1_000_003 * self.step + rank)
        self.last_tag = self.resume_tag

    # -- steps -----------------------------------------------------------------------------------
    def _set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def _forward_loss(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sum of token losses, number of labelled tokens, weighted auxiliary loss) of one micro-batch.

        The batch context is built here, on the host, once per micro-batch; every aux value is
        accumulated (detached) into `self.aux_sums` for the step's metrics."""
        ids = batch.input_ids.to(self.device, non_blocking=True)
        labels = batch.labels.to(self.device, non_blocking=True)
        context = BatchContext.from_doc_ids(batch.doc_ids, self.device, offsets=batch.doc_offsets)
        context.sequence_parallel = self.sp
        out = self.engine(ids, context)
        loss_sum = F.cross_entropy(
            out.logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        aux_loss = torch.zeros((), device=self.device)
        for key, value in out.aux.items():
            name = key.split("/")[0]
            if name in self.aux_weights:
                aux_loss = aux_loss + self.aux_weights[name] * value.float()
            self.aux_sums[key] = self.aux_sums.get(key, 0.0) + value.detach().float()
        return loss_sum, (labels != IGNORE_INDEX).sum(), aux_loss

    def _step_token_count(self, batches: list[Any]) -> torch.Tensor:
        """Labelled tokens of the whole optimizer step: every micro-batch on every rank (float64)."""
        import torch.distributed as dist

        count = torch.stack([(b.labels != IGNORE_INDEX).sum() for b in batches]).sum().double()
        count = count.to(self.device)
        dist.all_reduce(count)
        return count

    def _own_grad_norm(self) -> float:
        """Norm of the (all-reduced) gradients without ZeRO, where DeepSpeed reports none."""
        norms = [
            p.grad.detach().float().norm() for p in self.engine.module.parameters() if p.grad is not None
        ]
        return torch.stack(norms).norm().item() if norms else 0.0

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over grad_accum micro-batches. Returns its metrics; `skipped`: the global
        gradient norm was not finite, so nothing was updated (weights, optimizer moments and its step
        count, `self.step` and with it the LR schedule), while the data moved on."""
        import torch.distributed as dist

        t0, c0 = time.perf_counter(), time.process_time()
        self.iteration += 1
        lr = lr_at(self.step, self.config.train, self.total_steps)
        self._set_lr(lr)
        batches = [next(self.data.train) for _ in range(self.grad_accum)]
        # The LM loss is the mean over the labelled tokens of the whole step, however they fall on
        # micro-batches and ranks. DeepSpeed divides each backward by grad_accum and averages gradients
        # over ranks, so each micro-batch's loss sum is scaled by grad_accum x world / global count
        # (auxiliary losses, already means, are averaged over micro-batches and ranks as they are).
        n_tokens = self._step_token_count(batches)
        scale = self.grad_accum * self.dist.world_size / n_tokens.clamp_min(1)
        nan_here = self.iteration in _fault_steps("nan_at") and self.dist.is_main
        noise = float(_fault_value("loss_noise") or 0.0)
        loss_total = torch.zeros((), device=self.device, dtype=torch.float64)
        self.aux_sums = {}
        if self.sp is not None:
            self.sp.take_bytes()  # count this step's communication only
        # With sequence parallelism each rank's batch is one slice of its group's rows: the global
        # count above counts every token once, so the scale needs no sequence-parallel factor.
        for micro, batch in enumerate(batches):
            loss_sum, _, aux_loss = self._forward_loss(batch)
            if nan_here:
                loss_sum = loss_sum * float("nan")
            if noise:  # test hook: randomness drawn in the step (resume must restore the RNG)
                loss_sum = loss_sum * (1.0 + noise * torch.rand(()).item())
            self.engine.backward(loss_sum * scale.to(loss_sum.dtype) + aux_loss)
            loss_total += loss_sum.detach().double()
            if micro < self.grad_accum - 1:
                self.engine.step()  # DeepSpeed counts micro-steps; no update before the boundary
        dist.all_reduce(loss_total)
        if self.zero_stage == 0:
            # Without ZeRO, DeepSpeed steps the torch optimizer without looking at the gradients (all-
            # reduced by now, equal on every rank): a non-finite norm suppresses that one step.
            grad_norm = self._own_grad_norm()
            skipped = not math.isfinite(grad_norm)
            optimizer = self.engine.optimizer
            if skipped:
                optimizer.step = lambda *args, **kwargs: None
            try:
                self.engine.step()
            finally:
                if skipped:
                    del optimizer.step
        else:
            # DeepSpeed's ZeRO and bf16 optimizers skip a step whose gradients hold inf/NaN on any rank.
            self.engine.step()
            skipped = not self.engine.was_step_applied()
            grad_norm = self.engine.get_global_grad_norm()
            if isinstance(grad_norm, torch.Tensor):
                grad_norm = grad_norm.item()
            if skipped and grad_norm is not None and math.isfinite(grad_norm):
                grad_norm = float("nan")  # DeepSpeed reports the previous norm for a skipped step
        if not skipped:
            self.step += 1
        self.tokens += self.tokens_per_step
        comm = self.sp.take_bytes() if self.sp is not None else {}
        return {
            **self._aux_metrics(self.grad_accum * self.dist.world_size),
            "loss": (loss_total / n_tokens.clamp_min(1)).item(),
            **{f"comm/sp_bytes/layer{i}": b for i, b in sorted(comm.items())},
            "lr": lr,
            "grad_norm": grad_norm,
            "skipped": skipped,
            "time": time.perf_counter() - t0,
            "cpu_time": time.process_time() - c0,
        }

    def _aux_metrics(self, n_micro: int) -> dict[str, float]:
        """The step's mean aux values over all micro-batches and ranks, as `aux/<name>/layer<i>`, and
        for each auxiliary loss its sum over layers as `aux/<name>` (what the loss adds, unweighted)."""
        import torch.distributed as dist

        if not self.aux_sums:
            return {}
        keys = sorted(self.aux_sums)
        values = torch.stack([self.aux_sums[k] for k in keys])
        dist.all_reduce(values)
        means = dict(zip(keys, (values / n_micro).tolist()))
        metrics = {f"aux/{k}": v for k, v in means.items()}
        for name in self.aux_weights:
            metrics[f"aux/{name}"] = sum(v for k, v in means.items() if k.split("/")[0] == name)
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float] | None:
        import torch.distributed as dist

        n_batches = self.config.train.eval_batches
        if self.data.val is None or n_batches == 0:
            return None
        self.engine.eval()
        total = torch.zeros(2, device=self.device, dtype=torch.float64)
        source = self.data.val()
        it = iter(source)
        # eval_batches micro-batches in all, split over the ranks; null: the whole split once (the
        # validation reader gives every rank the same number of batches).
        per_rank = -(-(n_batches or 16) // self.layout.dp_size)
        if n_batches is None:
            with contextlib.suppress(TypeError):  # a split without a length: the default count
                per_rank = len(source)
        for _ in range(per_rank):
            try:
                batch = next(it)
            except StopIteration:  # a small validation split: start it over (same count on all ranks)
                it = iter(self.data.val())
                batch = next(it)
            loss_sum, n, _ = self._forward_loss(batch)
            total += torch.stack([loss_sum.double(), n.double()])
        self.engine.train()
        dist.all_reduce(total)
        val_loss = (total[0] / total[1]).item()
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}

    def _on_skip(self, m: dict[str, Any], logger: RunLogger, bar: Any) -> None:
        """Log a skipped step (a `skip` record keyed by iteration); too many in a row stop the run."""
        t = self.config.train
        # keyed by iteration; `last_step`: the optimizer steps applied so far
        values = {"last_step": self.step, "grad_norm": m["grad_norm"], "loss": m["loss"]}
        logger.log("skip", self.iteration, values)
        if self.dist.is_main:
            bar.write(
                f"iteration {self.iteration} (step {self.step + 1}): gradient norm {m['grad_norm']}, step "
                f"skipped ({self.nan_skips} in a row, train.max_nan_skips={t.max_nan_skips})"
            )
        if self.nan_skips > t.max_nan_skips:
            where = (
                f"last checkpoint: {self.run_dir / 'checkpoints' / self.last_tag}"
                if self.last_tag
                else "no checkpoint saved yet"
            )
            raise TrainingError(
                f"the gradient norm was not finite at {self.nan_skips} steps in a row, more than "
                f"train.max_nan_skips={t.max_nan_skips}; stopping at step {self.step} ({where}). Lower train.lr "
                "or check the data"
            )

    # -- the run ---------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        t = self.config.train
        main = self.dist.is_main
        if self.resume_tag is not None:
            self._load()
        if main:
            (self.run_dir / "config.yaml").write_text(dump_config(self.config))
        logger = RunLogger(self.run_dir, main, t.tensorboard)
        if main and self.step == 0:
            logger.log(
                "run",
                0,
                {
                    "params": self.n_params,
                    "flops_per_token": self.flops_per_token,
                    "world_size": self.dist.world_size,
                    "sequence_parallel_size": self.layout.sp_size,
                    "grad_accum": self.grad_accum,
                    "tokens_per_step": self.tokens_per_step,
                    "total_steps": self.total_steps,
                    "device": str(self.device),
                    "precision": "bf16" if self.bf16 else "fp32",
                    "zero_stage": self.zero_stage,
                    "peak_flops": self.peak,
                },
            )
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            unit="step",
            disable=not (main and t.progress_bar),
            dynamic_ncols=True,
            mininterval=1.0,
        )
        window_time, window_cpu, window_tokens, window_steps = 0.0, 0.0, 0, 0
        last: dict[str, Any] = {}
        try:
            while self.step < self.total_steps:
                m = self.train_step()
                window_time += m["time"]
                window_cpu += m["cpu_time"]
                window_tokens += self.tokens_per_step
                window_steps += 1
                if m["skipped"]:
                    self.nan_skips += 1
                    self._on_skip(m, logger, bar)
                    continue
                self.nan_skips = 0
                bar.update(1)
                final = self.step == self.total_steps
                if self.step % t.log_every == 0 or final:
                    tok_s = window_tokens / max(window_time, 1e-9)
                    record = {
                        "loss": m["loss"],
                        "lr": m["lr"],
                        "grad_norm": m["grad_norm"],
                        "tokens": self.tokens,
                        "tokens_per_s": tok_s,
                        "step_time_s": window_time / max(window_steps, 1),
                        # this process's CPU time (all threads) per step: robust to a busy machine
                        "step_cpu_s": window_cpu / max(window_steps, 1),
                        "mfu": (self.flops_per_token * tok_s / (self.peak * self.dist.world_size))
                        if self.peak
                        else None,
                        **memory_stats(self.device),
                        **{k: v for k, v in m.items() if k.startswith(("aux/", "comm/"))},
                    }
                    logger.log("train", self.step, record)
                    last = record
                    window_time, window_cpu, window_tokens, window_steps = 0.0, 0.0, 0, 0
                    if main:
                        bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}", tok_s=f"{tok_s:,.0f}")
                if self.step % t.eval_every == 0 or final:
                    val = self.evaluate()
                    if val is not None:
                        logger.log("val", self.step, val)
                        last.update(val)
                        if main:
                            bar.write(
                                f"step {self.step}: val_loss {val['val_loss']:.4f}  val_ppl {val['val_ppl']:.2f}"
                            )
                if self.step % t.save_every == 0 or final:
                    self.save()
                fault("kill_at_step", self.step)
        finally:
            bar.close()
            logger.close()
        summary = {"step": self.step, "tokens": self.tokens, "checkpoint": self.last_tag, **last}
        if main:
            tags = complete_tags(self.checkpointer.dir)
            summary["checkpoints"] = tags
        return summary


def _fault_value(name: str) -> str | None:
    """Test hook: the value of `name` in `LMSTACK_FAULT=name:value,...` (None when absent)."""
    for item in os.environ.get("LMSTACK_FAULT", "").split(","):
        key, _, value = item.partition(":")
        if key == name and value:
            return value
    return None


def _fault_steps(name: str) -> set[int]:
    """Test hook: `LMSTACK_FAULT=nan_at:3+4` -> {3, 4} (1-based iterations, skipped ones included)."""
    return {int(v) for v in (_fault_value(name) or "").split("+") if v}


def train(config: RunConfig, resume: str | None = None, source_factory=prepared_source) -> dict[str, Any]:
    """Train `config` (see lmstack.train); returns a summary of the final step."""
    import torch.distributed as dist

    owns_group = not dist.is_initialized()  # a caller's process group is left as it is
    try:
        trainer = Trainer(config, resume=resume, source_factory=source_factory)
        return trainer.run()
    finally:
        if owns_group:
            distributed.destroy()
