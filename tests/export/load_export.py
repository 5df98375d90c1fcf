"""Run in a fresh process by the export tests: load exported folders the way a user would.

    python [-I] load_export.py MODE FOLDER IDS_PT OUT_PT [MODE FOLDER IDS_PT OUT_PT ...]

MODE: `remote` (trust_remote_code, lmstack not imported), `lmstack` (`import lmstack`, plain
from_pretrained), `isolated` (like remote, but `lmstack`, `lmstack_kernels` and `triton` cannot be
imported: an environment where only torch and transformers are installed), `llama` (native Llama,
isolated too). Writes logits, greedy continuations and tokenizer output to OUT_PT.
"""

import sys

BLOCKED = ("lmstack", "lmstack_kernels", "triton")


class Blocker:
    """A meta-path finder that makes the blocked packages unimportable."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"No module named '{name}' (blocked by the export test)")
        return None


def main() -> None:
    args = sys.argv[1:]
    jobs = [args[i : i + 4] for i in range(0, len(args), 4)]
    modes = {job[0] for job in jobs}
    if modes & {"isolated", "llama"}:
        assert "lmstack" not in modes, "the lmstack route cannot run in an isolated process"
        sys.meta_path.insert(0, Blocker())
    for job in jobs:
        load(*job)


def load(mode: str, folder: str, ids_path: str, out_path: str) -> None:
    import os

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if mode == "lmstack":
        import lmstack  # noqa: F401  (registers the Auto classes)

        model = AutoModelForCausalLM.from_pretrained(folder)
        assert type(model).__module__.startswith("lmstack."), type(model).__module__
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=(mode != "llama"))
        if mode == "llama":
            assert type(model).__name__ == "LlamaForCausalLM", type(model)
        else:
            assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert not any(n.split(".")[0] in ("lmstack", "lmstack_kernels") for n in sys.modules), (
            "lmstack was imported"
        )
    if mode in ("isolated", "llama"):
        for name in BLOCKED:
            try:
                __import__(name)
            except ImportError:
                continue
            raise AssertionError(f"{name} is importable")
    model.eval()
    ids = torch.load(ids_path)
    result = {"class": f"{type(model).__module__}.{type(model).__name__}"}
    with torch.no_grad():
        result["logits"] = model(ids).logits
    result["greedy"] = model.generate(ids[:, :4], max_new_tokens=6, do_sample=False)
    if os.path.exists(os.path.join(folder, "tokenizer_config.json")):
        # AutoTokenizer reads config.json first: without lmstack its auto_map needs trust_remote_code.
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=mode != "lmstack")
        result["encoded"] = tok("The quick brown fox.")["input_ids"]
        result["eos_token_id"] = tok.eos_token_id
    torch.save(result, out_path)


if __name__ == "__main__":
    main()
