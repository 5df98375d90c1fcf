"""`lmstack export`: the bundle, loading it in fresh processes (with and without lmstack), native Llama
export, DeepSpeed checkpoints, atomic writes and error messages."""

from __future__ import annotations

import ast
import json
import socket
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from export_helpers import PYTHON, hybrid_layers, subprocess_env, tiny_config, tiny_model

from lmstack.cli import main
from lmstack.config import RunConfig
from lmstack.errors import LMStackError
from lmstack.export.checkpoint import load_checkpoint_model, save_model_dir
from lmstack.export.exporter import export_model
from lmstack.export.hf import LMStackConfig, LMStackForCausalLM

HERE = Path(__file__).parent
LOADER = HERE / "load_export.py"


def reference_outputs(model, ids: torch.Tensor) -> dict:
    hf = LMStackForCausalLM(LMStackConfig.from_model_config(model.config))
    hf.model.load_state_dict(model.state_dict())
    hf.eval()
    with torch.no_grad():
        logits = model(ids)[0]
    return {"logits": logits, "greedy": hf.generate(ids[:, :4], max_new_tokens=6, do_sample=False)}


def load_in_subprocess(jobs: list[tuple[str, Path, torch.Tensor]], tmp_path: Path) -> list[dict]:
    """Load each (mode, folder, ids) in ONE fresh process (see load_export.py); -> their results."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    argv, outs = [], []
    for i, (mode, folder, ids) in enumerate(jobs):
        ids_path, out_path = tmp_path / f"ids-{i}.pt", tmp_path / f"out-{i}.pt"
        torch.save(ids, ids_path)
        argv += [mode, str(folder), str(ids_path), str(out_path)]
        outs.append(out_path)
    isolated = any(mode in ("isolated", "llama") for mode, _, _ in jobs)
    cwd = tmp_path / "cwd"
    cwd.mkdir(exist_ok=True)
    proc = subprocess.run(
        [PYTHON, *(["-I"] if isolated else []), str(LOADER), *argv],
        cwd=cwd,
        env=subprocess_env(tmp_path),
        stdin=subprocess.DEVNULL,  # transformers may prompt about remote code: never wait for it
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"loading {[j[0] for j in jobs]} failed:\n{proc.stderr[-4000:]}"
    return [torch.load(out) for out in outs]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path, vocab_size: int) -> dict:
    """Two exports, each loaded in fresh processes:
    - `out`: a model using every registered mixer, saved as a model dir with the tokenizer and exported
      by the CLI with a tiny shard size;
    - `llama`: an attention-only model (untied head) exported as a native Llama.
    `isolated` holds what a process without lmstack (and without triton) got from both; `lmstack` what
    a process that imported lmstack got from the first (plain from_pretrained)."""
    root = tmp_path_factory.mktemp("exported")
    layers = hybrid_layers()
    model = tiny_model(vocab_size, layer_mixers=layers, n_layers=len(layers))
    ckpt = save_model_dir(model, root / "ckpt", tokenizer_dir=tokenizer_dir)
    out = root / "hf"
    main(["export", str(ckpt), str(out), "--max-shard-size", "40KB"])
    llama_model = tiny_model(vocab_size, tie_embeddings=False, rope_theta=500.0, seed=3)
    llama_out = root / "llama"
    llama_result = export_model(llama_model, llama_out, tokenizer_dir=tokenizer_dir, fmt="llama")
    ids = torch.randint(0, vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    isolated = load_in_subprocess([("isolated", out, ids), ("llama", llama_out, ids)], root / "isolated")
    (lmstack_route,) = load_in_subprocess([("lmstack", out, ids)], root / "lmstack")
    return {
        "out": out,
        "ids": ids,
        "ref": reference_outputs(model, ids),
        "llama_out": llama_out,
        "llama_ref": reference_outputs(llama_model, ids),
        "llama_result": llama_result,
        "remote": isolated[0],
        "llama": isolated[1],
        "lmstack": lmstack_route,
    }


def test_bundle_files(exported: dict, tokenizer_dir: Path) -> None:
    out: Path = exported["out"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "lmstack"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_lmstack.LMStackConfig",
        "AutoModelForCausalLM": "modeling_lmstack.LMStackForCausalLM",
    }
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    for name in (
        "configuration_lmstack.py",
        "modeling_lmstack.py",
        "generation_config.json",
        "tokenizer.json",
    ):
        assert (out / name).is_file(), name
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 0  # <|endoftext|>, taken from the tokenizer
    card = " ".join((out / "README.md").read_text().split())
    assert "left-padded" in card and "not supported" not in card  # batched generation works (test_hf)
    # The bundled code imports nothing from lmstack: every internal import became a flat relative one.
    for path in out.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            assert not any(n.split(".")[0] in ("lmstack", "lmstack_kernels") for n in names), (
                path.name,
                names,
            )


@pytest.mark.parametrize("route", ["remote", "lmstack"])
def test_export_loads_in_fresh_process(exported: dict, route: str, tokenizer_dir: Path) -> None:
    """remote: trust_remote_code=True where lmstack, lmstack_kernels and triton cannot be imported (`python
    -I`, a meta-path blocker, cwd elsewhere); lmstack: `import lmstack` then plain from_pretrained."""
    from transformers import AutoTokenizer

    got = exported[route]
    if route == "lmstack":
        assert got["class"] == "lmstack.export.modeling_lmstack.LMStackForCausalLM"
    else:
        assert got["class"].startswith("transformers_modules.") and got["class"].endswith(
            ".LMStackForCausalLM"
        )
    diff = (got["logits"] - exported["ref"]["logits"]).abs().max().item()
    assert diff < 1e-4, f"{route}: max abs logit diff {diff}"
    assert torch.equal(got["greedy"], exported["ref"]["greedy"])
    assert (
        got["encoded"]
        == AutoTokenizer.from_pretrained(str(tokenizer_dir))("The quick brown fox.")["input_ids"]
    )


def test_native_llama_export(exported: dict, tmp_path: Path, vocab_size: int) -> None:
    # In a process without lmstack: a plain LlamaForCausalLM whose logits match ours.
    got = exported["llama"]
    assert got["class"].endswith("LlamaForCausalLM") and got["class"].startswith("transformers.")
    diff = (got["logits"] - exported["llama_ref"]["logits"]).abs().max().item()
    assert diff < 1e-4, f"native Llama logits differ by {diff}"
    assert torch.equal(got["greedy"], exported["llama_ref"]["greedy"])
    assert exported["llama_result"].max_abs_diff < 1e-4  # the exporter's own check
    config = json.loads((exported["llama_out"] / "config.json").read_text())
    assert (
        config["model_type"] == "llama"
        and "auto_map" not in config
        and config["tie_word_embeddings"] is False
    )
    assert not list(exported["llama_out"].glob("*.py"))
    # Tied embeddings -> tie_word_embeddings (checked in-process).
    from transformers import LlamaForCausalLM

    model = tiny_model(vocab_size, tie_embeddings=True)
    export_model(model, tmp_path / "tied", fmt="llama")
    llama = LlamaForCausalLM.from_pretrained(tmp_path / "tied").eval()
    assert llama.config.tie_word_embeddings and llama.lm_head.weight is llama.model.embed_tokens.weight
    ids = exported["ids"]
    with torch.no_grad():
        assert (llama(ids).logits - model(ids)[0]).abs().max().item() < 1e-4


def test_llama_export_refuses_other_mixers(tmp_path: Path, vocab_size: int) -> None:
    layers = hybrid_layers()
    model = tiny_model(vocab_size, layer_mixers=layers, n_layers=len(layers))
    with pytest.raises(LMStackError, match="native Llama"):
        export_model(model, tmp_path / "out", fmt="llama")
    assert not (tmp_path / "out").exists()


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_deepspeed_checkpoint_round_trip(
    tmp_path: Path, tokenizer_dir: Path, vocab_size: int, capsys
) -> None:
    run_config = RunConfig(model=tiny_config(vocab_size))
    import dataclasses
    import shutil

    (tmp_path / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(run_config), sort_keys=False))
    shutil.copytree(tokenizer_dir, tmp_path / "tokenizer")
    stages = ["0", "3"]
    proc = subprocess.run(
        [PYTHON, str(HERE / "make_ds_checkpoint.py"), str(tmp_path), free_port(), *stages],
        env=subprocess_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    for stage in stages:
        run = tmp_path / f"stage{stage}"
        reference = torch.load(run / "reference.pt")
        tag = run / "checkpoints" / "step_00000001"
        for path in (run, run / "checkpoints", tag):  # run dir, checkpoints dir, tag dir
            model, loaded_config, tok = load_checkpoint_model(path)
            assert loaded_config.model == run_config.model
            assert tok == tag / "tokenizer"
            state = model.state_dict()
            assert set(state) == set(reference)
            assert all(torch.equal(state[k], reference[k]) for k in reference), (
                f"stage {stage}: weights differ"
            )
        out = tmp_path / f"hf{stage}"
        main(["export", str(run), str(out)])
        printed = capsys.readouterr().out
        assert "verified" in printed and "--format llama" in printed
        hf = LMStackForCausalLM.from_pretrained(out).eval()
        ids = torch.randint(0, vocab_size, (1, 10))
        with torch.no_grad():
            assert (hf(ids).logits - model(ids)[0]).abs().max().item() < 1e-5
        assert (out / "tokenizer.json").is_file()


def test_bad_checkpoint_is_one_line_cli_error(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "no-such-run"
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(missing), str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == f"lmstack export: error: {missing}: checkpoint not found\n"
    assert not (tmp_path / "out").exists()


def run_export_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "lmstack.cli", "export", *args],
        capture_output=True,
        text=True,
        env=subprocess_env(tmp_path),
        timeout=300,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    err = result.stderr.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def test_corrupt_or_mismatched_model_dir_is_one_line_cli_error(tmp_path: Path, vocab_size: int) -> None:
    truncated = save_model_dir(tiny_model(vocab_size), tmp_path / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = run_export_cli(tmp_path, str(truncated), str(tmp_path / "out1"))
    assert_one_line_error(result, str(weights), "corrupt or truncated")
    assert not (tmp_path / "out1").exists()

    mismatched = save_model_dir(tiny_model(vocab_size), tmp_path / "mismatched")
    config = yaml.safe_load((mismatched / "config.yaml").read_text())
    config["model"]["d_model"] *= 2
    (mismatched / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    result = run_export_cli(tmp_path, str(mismatched), str(tmp_path / "out2"))
    assert_one_line_error(result, str(mismatched), "do not match the model in config.yaml", "size mismatch")
    assert not (tmp_path / "out2").exists()


def test_bad_max_shard_size_is_rejected_before_writing(tmp_path: Path, vocab_size: int) -> None:
    with pytest.raises(LMStackError, match="--max-shard-size: expected a positive size.*'abc'"):
        export_model(tiny_model(vocab_size), tmp_path / "out", max_shard_size="abc")
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_errors_name_the_path(tmp_path: Path, vocab_size: int, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LMStackError, match=f"{empty}: no checkpoint found"):
        load_checkpoint_model(empty)
    ckpt = save_model_dir(tiny_model(vocab_size), tmp_path / "ckpt")
    (ckpt / "config.yaml").unlink()
    with pytest.raises(LMStackError, match="config.yaml is missing"):
        load_checkpoint_model(ckpt)
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "latest").write_text("step_00000009")
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tmp_path / "run"), str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "step_00000009" in err and str(ckpts / "latest") in err


def test_export_is_atomic(tmp_path: Path, vocab_size: int, monkeypatch) -> None:
    import lmstack.export.exporter as exporter

    model = tiny_model(vocab_size)
    out = tmp_path / "out"

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(exporter, "_verify", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export_model(model, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither OUT_DIR nor a temporary folder
    monkeypatch.undo()

    result = export_model(model, out)
    assert "no tokenizer" in result.notes[0] and not (out / "tokenizer.json").exists()
    with pytest.raises(LMStackError, match="--overwrite"):
        export_model(model, out)
    (out / "stale.txt").write_text("old")
    export_model(model, out, overwrite=True, dtype="bfloat16")
    assert not (out / "stale.txt").exists()
    loaded = LMStackForCausalLM.from_pretrained(out)
    assert loaded.dtype == torch.bfloat16 and next(model.parameters()).dtype == torch.float32


def test_bundler_guards_optional_imports(tmp_path: Path, monkeypatch) -> None:
    """An unguarded `import triton` in kernel code is wrapped so that the module still imports without it."""
    import importlib
    import sys
    import types

    from lmstack.export.bundle import _STUB_SOURCE, STUB_MODULE, _Rewriter

    source = (
        '"""A kernel module."""\n\nfrom __future__ import annotations\n\nimport torch\nimport triton\n'
        "import triton.language as tl\n\n\n@triton.jit\ndef kernel(x, BLOCK: tl.constexpr):\n    pass\n\n\n"
        "def run(x):\n    from triton.runtime import driver\n\n    kernel[(1,)](x, BLOCK=16)\n    return driver\n"
        "\n\nfrom typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from lmstack.train.trainer import Trainer\n"
    )
    path = tmp_path / "pkg" / "fake_kernel.py"
    path.parent.mkdir()
    rewritten = _Rewriter("lmstack_kernels.fake_kernel", source, path).run()
    assert "except ImportError" in rewritten
    assert "lmstack.train" not in rewritten  # type-checking imports are dropped, not bundled
    path.write_text(rewritten)
    (path.parent / f"{STUB_MODULE}.py").write_text(_STUB_SOURCE)
    for name in ("triton", "triton.language", "triton.runtime"):
        monkeypatch.setitem(sys.modules, name, None)  # `import triton` now raises ImportError
    pkg = types.ModuleType("_bundle_test_pkg")
    pkg.__path__ = [str(path.parent)]
    monkeypatch.setitem(sys.modules, "_bundle_test_pkg", pkg)
    module = importlib.import_module("_bundle_test_pkg.fake_kernel")
    with pytest.raises(ImportError, match="triton"):
        module.run(torch.zeros(2))
    for name in [n for n in sys.modules if n.startswith("_bundle_test_pkg")]:
        monkeypatch.delitem(sys.modules, name)


@pytest.mark.slow
def test_export_loads_in_venv_with_only_torch_and_transformers(exported: dict, tmp_path: Path) -> None:
    """A real virtual environment with only torch + transformers (pip install; needs PyPI, ~2-3 min)."""
    import transformers

    venv = tmp_path / "venv"
    subprocess.run([PYTHON, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, f"torch=={torch.__version__.split('+')[0]}"], check=True, timeout=600)
    subprocess.run([*pip, f"transformers=={transformers.__version__}"], check=True, timeout=600)
    ids_path, out_path = tmp_path / "ids.pt", tmp_path / "out.pt"
    torch.save(exported["ids"], ids_path)
    (tmp_path / "cwd").mkdir()
    proc = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-I",
            str(LOADER),
            "remote",
            str(exported["out"]),
            str(ids_path),
            str(out_path),
        ],
        cwd=tmp_path / "cwd",
        env=subprocess_env(tmp_path),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = torch.load(out_path)
    assert (got["logits"] - exported["ref"]["logits"]).abs().max().item() < 1e-4
    assert torch.equal(got["greedy"], exported["ref"]["greedy"])
