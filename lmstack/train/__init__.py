"""Training: `lmstack train CONFIG [overrides] [--resume auto]`.

One code path for one plain process (a world of 1 over gloo is created here), `torchrun
--nproc_per_node N` and multi-node torchrun with c10d rendezvous (see launch/). The model is wrapped
in a DeepSpeed engine (ZeRO stage `train.zero_stage`); bf16 with fp32 master weights and fp32
gradient accumulation on CUDA, fp32 on CPU. AdamW (beta 0.9/0.95; no weight decay on norms, biases
and embeddings, see optim.py), linear warm-up then cosine to `min_lr`, gradient clipping.

Per optimizer step: `global_batch_size` sequences = micro_batch_size x grad_accum x data-parallel
ranks (checked, with an error naming the three numbers).

Run directory: config.yaml, metrics.jsonl (train/val records), tensorboard/, checkpoints/ (see
checkpoint.py; atomic, last `keep_last` kept, client_state with step, tokens, every rank's reader
position and RNG states), and the PNG curves of `lmstack plot RUN_DIR`.

Non-finite losses: the step is discarded on every rank (no parameter or optimizer-state update) and
counted; beyond `train.max_nan_skips` the run stops with an error and the last checkpoint untouched.
(How: a micro-batch whose loss is not finite is back-propagated times NaN, so every gradient is
NaN; DeepSpeed's ZeRO optimizers then skip the step on their overflow check, and without ZeRO the
torch optimizer's step is suppressed for that one step. The LR schedule and the data move on.)

Resume (`--resume auto`): weights, optimizer state, step, tokens, non-finite count, the reader's
position and every rank's RNG states come back, so on CPU in fp32 the losses after a SIGKILL and
resume equal the uninterrupted run's, step for step (tests/train/test_resume.py). With another
number of ranks the reader re-splits the remaining samples exactly (lmstack.data); ZeRO 0 weights
and optimizer load as they are, while ZeRO 1-3 optimizer shards need DeepSpeed's universal
checkpoint conversion first; RNG streams are reseeded from (seed, step, rank).

Metrics (RUN_DIR/metrics.jsonl, every `log_every` steps): loss, lr, grad_norm (before clipping),
tokens/s (all ranks), MFU (see metrics.py: each mixer's own FLOPs; peak FLOP/s by GPU model, none
on CPU), step time and CPU time, peak memory; `val` records (loss, perplexity) every `eval_every`.

Options: `activation_checkpointing` (each block recomputed in backward, torch non-reentrant
checkpointing); `compile` (torch.compile of each block, in place so parameter names and
checkpoints are unchanged; default on with CUDA, off on CPU).
"""

from lmstack.train.trainer import Trainer, TrainingError, batch_layout, train

__all__ = ["Trainer", "TrainingError", "batch_layout", "train"]
