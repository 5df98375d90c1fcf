"""Hugging Face export: config/model wrappers, the self-contained export bundle, native Llama export.

- `hf`: `LMStackConfig`, `LMStackForCausalLM` (generate() with lmstack's own cache) and
  `register_auto_classes()` (called by `import lmstack`).
- `bundle`: copies the model-definition code into an export folder with flat relative imports, so
  that it loads where lmstack is not installed.
- `checkpoint`: loads a trainer checkpoint (DeepSpeed ZeRO 0-3) as an `LM`.
- `exporter`: `export_checkpoint()` / `export_model()`, the work behind `lmstack export`.
- `llama`: converts an attention-only model to a native `LlamaForCausalLM`.

Nothing heavy is imported here: `import lmstack` imports `lmstack.export.hf` on every start.
"""
