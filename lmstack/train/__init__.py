"""Training: `lmstack train CONFIG [overrides] [--resume auto]`.

One code path for one plain process (a world of 1 over gloo is created here), `torchrun
--nproc_per_node N` and multi-node torchrun with c10d rendezvous (see launch/). The model is wrapped
in a DeepSpeed engine (ZeRO stage `train.zero_stage`); bf16 with fp32 master weights and fp32
gradient accumulation on CUDA, fp32 on CPU. AdamW (beta 0.9/0.95; no weight decay on norms, biases
and embeddings, see optim.py), linear warm-up then cosine to `min_lr`, gradient clipping.

Per optimizer step: `global_batch_size` sequences = micro_batch_size x grad_accum x data-parallel
ranks (checked, with an error naming the three numbers).

The parts (each owns its state; `trainer.py` composes them and runs the loop): `layout.py` (ranks and
batch arithmetic), `data.py` (the trainer's view of the readers), `build.py` (the model, activation
checkpointing, compile), `engine.py` (DeepSpeed, the guarded optimizer step), `optim.py` (AdamW
groups, LR schedule), `state.py` (counters, RNG), `checkpoint.py` (atomic saves, resume),
`metrics.py` (records, MFU), `stop.py` (stop signals: save at the same step on every rank, exit 75),
`run_dir.py` (one training per run directory), `faults.py` (test-only fault injection),
`distributed.py` (process group).
docs/training.md draws the whole shape.

Run directory: config.yaml, metrics.jsonl (train/val records), tensorboard/, checkpoints/ (see
checkpoint.py; atomic, last `keep_last` kept, client_state with step, tokens, every rank's reader
position and RNG states), and the PNG curves of `lmstack plot RUN_DIR`.

Loss: the mean over the labelled tokens of the whole step (all micro-batches, all ranks): the token
count of the step is all-reduced first and every micro-batch's loss sum scaled by it.

Non-finite gradients: a step whose global gradient norm is inf/NaN is skipped on every rank (no
change to the fp32 master weights, optimizer moments and step counts, the step count or the LR
schedule; the data move on) and logged as a `skip` record; more than `train.max_nan_skips` skips in a
row stop the run with an error naming its last checkpoint. (DeepSpeed's ZeRO and bf16 optimizers skip
on their own overflow check; without ZeRO the engine checks the norm and its `GuardedAdamW` skips.)

Resume (`--resume auto|PATH`): weights, optimizer state, step, tokens, the reader's position and every
rank's RNG states come back, so on CPU in fp32 the losses after a SIGKILL and resume equal the
uninterrupted run's, step for step (tests/train/test_resume.py). On another number of ranks the
reader re-splits the remaining samples exactly (lmstack.data), ZeRO 1-3 optimizer shards are
converted to DeepSpeed's universal checkpoint and re-partitioned (checkpoint.py), ZeRO 0 loads as it
is; RNG streams are reseeded from (seed, step, rank). A checkpoint whose model, ZeRO stage family or
precision differs, an incomplete one, or one whose pickles hold anything but tensors and DeepSpeed's
own types is refused with a one-line error before anything is loaded.

Metrics (RUN_DIR/metrics.jsonl, every `log_every` steps): loss, lr, grad_norm (before clipping),
tokens/s (all ranks), MFU (see metrics.py: each mixer's own FLOPs; peak FLOP/s by GPU model, none
on CPU), step time and CPU time, peak memory; `val` records (loss, perplexity) every `eval_every`.

Options: `activation_checkpointing` (each block recomputed in backward, torch non-reentrant
checkpointing); `compile` (torch.compile of each block, in place so parameter names and
checkpoints are unchanged; default on with CUDA, off on CPU).
"""

from lmstack.train.layout import RunLayout, batch_layout
from lmstack.train.trainer import Trainer, TrainingError, train

__all__ = ["RunLayout", "Trainer", "TrainingError", "batch_layout", "train"]
