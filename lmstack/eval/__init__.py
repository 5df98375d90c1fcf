"""Evaluation: lm-eval zero-shot tasks on exports (`harness`), Zoology's MQAR associative-recall
sweep (`mqar`), held-out perplexity on prepared data (`ppl`), and `compare` (several mixers or
configs trained on the same budget, measured and reported side by side). The CLI is `lmstack eval`
(arguments in `lmstack.eval.cli`) and `lmstack compare`. Submodules are imported on use: lm-eval is heavy to import."""
