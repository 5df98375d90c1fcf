"""Step `mixer_checks`: every registered mixer (`lmstack.model.mixers.MIXERS`), through the public LM API.

- Cached decoding equals the full forward: prefill two thirds of a sequence with `use_cache=True`,
  then feed the rest one token at a time with the returned cache; the logits, concatenated, against
  one forward over the whole sequence (fp32 with TF32 matmuls off; bf16 weights, looser).
- No host sync in a training step: forward and backward (bf16 autocast) of packed documents (the
  batch context is built on the host first, as the trainer does) under
  `torch.cuda.set_sync_debug_mode("error")`, after one warm-up step, so any per-layer `.item()`,
  `.tolist()`, `nonzero` or host copy raises; the failing call's lmstack frame is recorded. Softmax
  attention with packed documents takes its FlexAttention path there.
A failing mixer is recorded in `failures` and the others still run. Dry run: CPU, a tiny model; the
sync check cannot be made there (the mode exists only on CUDA) and is reported as skipped.
"""

from __future__ import annotations

import contextlib
import time
import traceback

import torch
import torch.nn.functional as F
from common import REPO, Report, step_args
from helpers import rel_rmse

from lmstack.model import LM, BatchContext, ModelConfig
from lmstack.model.mixers import MIXERS

# Logits' relative RMSE, cached decoding vs full forward. fp32: Triton dots run in tf32.
DECODE_TOLERANCE = {"fp32": 5e-3, "bf16": 5e-2}
SIZES = {  # model and batch per mode
    "gpu": dict(d_model=512, n_layers=2, n_heads=4, vocab_size=4096, B=2, T=384),
    "dry": dict(d_model=64, n_layers=2, n_heads=2, vocab_size=256, B=2, T=24),
}


def build(name: str, size: dict, device: torch.device) -> LM:
    keys = ("d_model", "n_layers", "n_heads", "vocab_size")
    # swa: a window shorter than the sequence, so that the band (FlexAttention's block mask on CUDA,
    # the rolling decoding state) is what gets checked.
    options = {"swa": {"window": size["T"] // 3}} if name == "swa" else {}
    config = ModelConfig.from_dict(
        {**{k: size[k] for k in keys}, "max_seq_len": size["T"], "mixer": name, "mixer_options": options}
    )
    config.validate("model.")
    torch.manual_seed(0)
    return LM(config).to(device)


def decode_error(model: LM, ids: torch.Tensor) -> float:
    """Relative RMSE of the logits from prefill + one-token steps against one full forward."""
    with torch.no_grad():
        full = model(ids).logits
        prefill = ids.shape[1] * 2 // 3
        logits, cache, _ = model(ids[:, :prefill], use_cache=True)
        pieces = [logits]
        for t in range(prefill, ids.shape[1]):
            logits, cache, _ = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            pieces.append(logits)
    return rel_rmse(torch.cat(pieces, 1), full)


def sync_site(err: BaseException) -> str:
    """The innermost frame of lmstack's own code in the error's traceback (where the sync was asked for)."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if f.filename.startswith(str(REPO))]
    if not frames:
        return "outside lmstack"
    f = frames[-1]
    return f"{f.filename.removeprefix(str(REPO) + '/')}:{f.lineno} {f.line}"


def training_step(model: LM, ids: torch.Tensor, context: BatchContext, cuda: bool) -> None:
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        logits = model(ids[:, :-1], context).logits
    F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten()).backward()


def check_mixer(report: Report, name: str, size: dict, device: torch.device) -> None:
    cuda = device.type == "cuda"
    row: dict = {"mixer": name, **size, "decode_rel_rmse": {}, "decode_tolerance": DECODE_TOLERANCE}
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, size["vocab_size"], (size["B"], size["T"] + 1), generator=gen).to(device)
    model = build(name, size, device)
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        err = decode_error(model.to(dtype).eval(), ids[:, :-1])
        row["decode_rel_rmse"][dtype_name] = err
        if not err < DECODE_TOLERANCE[dtype_name]:
            report.fail(f"{name}: cached decoding != full forward in {dtype_name}: rel RMSE {err:.2e}")
    model = model.float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda or None)
    # Three documents per row, built on the host before the guard (the trainer does the same).
    T = size["T"]
    doc_ids = (torch.arange(T) >= T // 3).long() + (torch.arange(T) >= T // 2).long()
    context = BatchContext.from_doc_ids(doc_ids.expand(size["B"], T), device)
    training_step(model, ids, context, cuda)  # warm-up: kernel compilation and first-call setup may sync
    opt.step()
    opt.zero_grad(set_to_none=True)
    # A fresh context, as for every trainer micro-batch: per-batch structures (attention's block mask)
    # are built inside the guarded step.
    context = BatchContext.from_doc_ids(doc_ids.expand(size["B"], T), device)
    guard = contextlib.nullcontext()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        guard = contextlib.ExitStack()
        guard.callback(torch.cuda.set_sync_debug_mode, "default")
    try:
        with guard:
            training_step(model, ids, context, cuda)
        row["host_sync_in_step"] = False if cuda else None
    except RuntimeError as err:
        row["host_sync_in_step"] = True
        row["sync_site"] = sync_site(err)
        report.fail(
            f"{name}: host sync in forward/backward at {row['sync_site']}: {str(err).splitlines()[0]}"
        )
    if not cuda:
        report.skip(f"{name} sync check", "torch.cuda.set_sync_debug_mode needs CUDA")
    opt.step()
    report.add(row)
    print(f"{name}: decode rel RMSE {row['decode_rel_rmse']}, host sync {row['host_sync_in_step']}")


def main() -> None:
    args = step_args(__doc__.split("\n\n")[0])
    device = torch.device("cpu" if args.dry_run else "cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    size = SIZES["dry" if args.dry_run else "gpu"]
    report = Report("mixer_checks", args, mixers=sorted(MIXERS))
    for name in sorted(MIXERS):
        t0 = time.perf_counter()
        try:
            check_mixer(report, name, size, device)
        except Exception as err:  # noqa: BLE001  (one mixer's crash must not hide the others' results)
            report.fail(f"{name}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            traceback.print_exc()
        print(f"{name}: {time.perf_counter() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
