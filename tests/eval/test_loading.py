"""`lmstack.eval.loading.load_model`: one loader for exports, run directories and checkpoint tags."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_rel_rmse

from lmstack.errors import LMStackError
from lmstack.eval.loading import load_model
from lmstack.model import LM


@pytest.fixture(scope="module")
def reference_logits(checkpoint):
    """Logits of the DeepSpeed engine's own weights in a freshly built LM (not through any loader)."""
    torch.manual_seed(1)
    ids = torch.randint(0, checkpoint["config"].model.vocab_size, (2, 24))
    model = LM(checkpoint["config"].model).eval()
    model.load_state_dict(checkpoint["reference"])
    with torch.no_grad():
        return ids, model(ids).logits


@pytest.mark.parametrize("where", ["export", "run", "checkpoints", "tag"])
@pytest.mark.parametrize("hf", [False, True])
def test_every_folder_gives_the_same_logits(checkpoint, reference_logits, where, hf):
    path = checkpoint["run"] / "checkpoints" if where == "checkpoints" else checkpoint[where]
    loaded = load_model(path, hf=hf, device="cpu")
    ids, reference = reference_logits
    with torch.no_grad():
        logits = loaded.model(ids).logits
    assert_rel_rmse(logits, reference, 1e-6, f"{where}, hf={hf}")
    assert not loaded.model.training
    if hf:
        assert type(loaded.model).__name__ == "LMStackForCausalLM"
        assert loaded.tokenizer.vocab_size == checkpoint["config"].data.vocab_size
        assert loaded.add_bos is False  # the data was prepared without BOS
        assert loaded.model.generation_config.eos_token_id == 0
    else:
        assert isinstance(loaded.model, LM)
    # A checkpoint brings its run config (data path and seq_len for `eval ppl`); an export does not.
    assert (loaded.run_config is None) == (where == "export")
    if where != "export":
        assert loaded.run_config.model == checkpoint["config"].model


def test_checkpoint_and_export_wrappers_generate_alike(checkpoint):
    """The in-memory wrapper of a checkpoint carries the export's config: greedy generation with the
    cache gives the same tokens."""
    ids = torch.tensor([[5, 17, 9, 33, 2, 40]])
    outputs = []
    for where in ("export", "tag"):
        model = load_model(checkpoint[where], device="cpu").model
        outputs.append(model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0))
    assert torch.equal(outputs[0], outputs[1]) and outputs[0].shape == (1, 14)


def test_dtype_applies_to_every_folder(checkpoint):
    for where in ("export", "tag"):
        for hf in (False, True):
            model = load_model(checkpoint[where], "bfloat16", hf=hf, device="cpu").model
            assert {p.dtype for p in model.parameters()} == {torch.bfloat16}, (where, hf)


def test_bad_paths_are_one_line_errors_naming_the_path(tmp_path, checkpoint):
    missing = tmp_path / "missing"
    empty = tmp_path / "empty"
    empty.mkdir()
    half_export = tmp_path / "half"
    half_export.mkdir()
    (half_export / "config.json").write_text((checkpoint["export"] / "config.json").read_text())
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"\0" * 8)
    cases = [
        (missing, "no such model folder or checkpoint"),
        (empty, "no checkpoint found"),
        (half_export, "config.json without weights"),
        (a_file, "expected a directory"),
    ]
    for path, needle in cases:
        with pytest.raises(LMStackError) as err:
            load_model(path, hf=False)
        message = str(err.value)
        assert message.startswith(f"{path}: ") and needle in message and "\n" not in message, message
    from lmstack.export.checkpoint import save_model_dir

    no_tokenizer = save_model_dir(LM(checkpoint["config"].model), tmp_path / "model", checkpoint["config"])
    with pytest.raises(LMStackError) as err:
        load_model(no_tokenizer, hf=True)  # lm-eval needs the tokenizer; the native model does not
    assert str(err.value).startswith(f"{no_tokenizer}: the checkpoint has no tokenizer/ folder")
    assert isinstance(load_model(no_tokenizer, hf=False, device="cpu").model, LM)
    with pytest.raises(LMStackError, match="--dtype: expected one of auto, float32"):
        load_model(checkpoint["export"], "float64")
