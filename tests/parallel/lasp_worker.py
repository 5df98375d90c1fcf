"""torchrun worker of tests/parallel/test_lasp.py: `lasp_worker.py OUT.json MIXER_SPEC...`.

Every rank runs its slice of the same rows through the same model (one sequence-parallel group of
all ranks) and back-propagates the same per-logit weights; gradients are summed over the group.
Rank 0 also runs the whole rows in one pass and writes the relative RMSE of the gathered logits and
of every parameter gradient, and the bytes each layer sent, to OUT.json.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import rel_rmse  # noqa: E402

from lmstack.model import LM, BatchContext, ModelConfig  # noqa: E402
from lmstack.parallel import build_layout  # noqa: E402

VOCAB = 61


def doc_ids(world: int, n: int) -> torch.Tensor:
    """Rows of world·n tokens: documents crossing every cut, one starting exactly on each cut, and
    one document over the whole row (its state crosses every slice)."""
    T = world * n
    cuts = [r * n for r in range(1, world)]
    crossing = torch.zeros(T, dtype=torch.long)
    for c in cuts:
        crossing[c - n // 3 :] += 1  # a document starts a third of a slice before each cut
    on_cut = torch.zeros(T, dtype=torch.long)
    for c in cuts:
        on_cut[c:] += 1
    return torch.stack([crossing, on_cut, torch.zeros(T, dtype=torch.long)])


def layer_spec(name: str) -> str | dict:
    """ "swa@5": swa with a window of 5; a ":flex" suffix takes attention's / swa's FlexAttention path
    (eager on CPU) instead of the explicit mask / banded one."""
    name, flex = name.removesuffix(":flex"), name.endswith(":flex")
    mixer, _, window = name.partition("@")
    spec = {"mixer": mixer, **({"window": int(window)} if window else {})}
    if flex:
        spec["path" if mixer == "swa" else "packed_path"] = "flex"
    return spec if len(spec) > 1 else mixer


def model_config(spec: str) -> ModelConfig:
    """ "a+b+c": one layer per name (see `layer_spec`); swa's default window is 24: over a slice of 17,
    so that the window reaches two ranks back."""
    layers = [layer_spec(name) for name in spec.split("+")]
    cfg = ModelConfig(
        vocab_size=VOCAB, d_model=64, n_layers=len(layers), n_heads=4, n_kv_heads=2, max_seq_len=256,
        layer_mixers=layers, mixer_options={"swa": {"window": 24}},
    )  # fmt: skip
    cfg.validate()
    return cfg


def run(
    model: LM, ids, weights, context, ranks: int = 1, backward: bool = True
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(logits, all parameter gradients flattened, aux losses) of loss = Σ logits · weights + the
    auxiliary losses. Every rank holds the whole rows' aux losses (MoH's statistics are means over the
    group), so each adds 1/ranks of them for the group's gradients to sum to one process's. Without
    `backward` (FlexAttention has no CPU backward) the gradients are empty."""
    model.zero_grad()
    if not backward:
        with torch.no_grad():
            out = model(ids, context)
        return out.logits, torch.zeros(0), {}
    out = model(ids, context)
    losses = set().union(*(type(block.mixer).aux_losses for block in model.blocks))
    aux = {k: v for k, v in out.aux.items() if k.split("/")[0] in losses}
    ((out.logits * weights).sum() + sum(aux.values()) / ranks).backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    return out.logits.detach(), grads, {k: v.item() for k, v in aux.items()}


def main() -> None:
    out_path, specs = sys.argv[1], sys.argv[2:]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    sp = build_layout(rank, world, world).sequence
    report = {}
    for spec in specs:
        entry = {}
        for n in (17, 34):  # slice lengths: the second doubles T
            docs = doc_ids(world, n)
            g = torch.Generator().manual_seed(n)
            ids = torch.randint(0, VOCAB, docs.shape, generator=g)
            weights = torch.randn(*docs.shape, VOCAB, generator=g)
            torch.manual_seed(0)
            model = LM(model_config(spec))
            cols = slice(rank * n, (rank + 1) * n)
            context = BatchContext.for_slice(docs, cols.start, cols.stop)
            context.sequence_parallel = sp
            sp.take_bytes()
            backward = ":flex" not in spec
            logits, grads, aux = run(model, ids[:, cols], weights[:, cols], context, world, backward)
            sent = sp.take_bytes()
            dist.all_reduce(grads, group=sp.group)
            pieces = [torch.empty_like(logits) for _ in range(world)]
            dist.all_gather(pieces, logits, group=sp.group)
            if rank == 0:
                full = BatchContext.from_doc_ids(docs)
                full_logits, full_grads, full_aux = run(model, ids, weights, full, backward=backward)
                names = [name for name, _ in model.named_parameters()]
                sizes = [p.numel() for p in model.parameters()]
                entry[f"T={world * n}"] = {
                    "logits": rel_rmse(torch.cat(pieces, 1), full_logits),
                    "grads": {
                        name: rel_rmse(a, b)
                        for name, a, b in zip(names, grads.split(sizes), full_grads.split(sizes))
                    }
                    if backward
                    else {},
                    "bytes_sent": {str(layer): b for layer, b in sorted(sent.items())},
                    "aux": {k: abs(aux[k] - v) / abs(v) for k, v in full_aux.items()},
                }
        report[spec] = entry
    if rank == 0:
        Path(out_path).write_text(json.dumps(report, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
