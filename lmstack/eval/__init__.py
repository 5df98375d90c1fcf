"""Evaluation: lm-eval zero-shot tasks on exports (`harness`), Zoology's MQAR associative-recall
sweep (`mqar`) and held-out perplexity on prepared data (`ppl`). The CLI is `lmstack eval`
(arguments in `lmstack.eval.cli`). Submodules are imported on use: lm-eval is heavy to import."""
