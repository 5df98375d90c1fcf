"""Computed (not measured) communication of sequence parallelism per rank, per layer, per sequence:
LASP-2 (what lmstack does for linear mixers), LASP-2H (what it does for softmax attention), ring
(LASP-1) and all-to-all (DeepSpeed-Ulysses) schemes, for a model shape over sequence lengths T and
group sizes W. Bytes are what one rank sends, forward + backward, with the ring algorithm's
(W − 1) × piece for an all-gather / reduce-scatter (the least any algorithm sends per rank).

Conventions: activations and keys/values in bf16 (2 bytes), recurrent states and transitions in fp32
(4 bytes, as lmstack gathers them); one sequence (B = 1); d = H · Dh.

    LASP-2, lightning:  2 (W−1) H (1 + Dh²) · 4            gather of (λ^T, E), reduce-scatter of its gradient
    LASP-2, GLA:        2 (W−1) H (K + K Dh) · 4           K = Dh / 2 (expand_k 0.5): exp Σg [K] and E [K, Dh]
    LASP-2, DeltaNet:   2 (W−1) H (2 Dh²) · 4              P [Dh, Dh] and E [Dh, Dh]
                        + 2 (W−1) 3 · 3d · 2               its short convolution's last 3 inputs of q, k, v
    LASP-1 ring:        2 H Dh² · 4 bytes, but W − 1 sequential hops per layer (forward and backward)
    Ulysses:            8 (W−1)/W (T/W) d · 2              all-to-all of q, k, v, o; the same backward;
                                                           needs H (and the KV heads) divisible by W
    LASP-2H attention:  2 (W−1) (T/W) 2 d_kv · 2           gather of k, v; reduce-scatter of dk, dv

Writes benchmarks/results/sp_comm_<name>.json and prints a markdown table.

    python benchmarks/sp_comm.py                       # the 1.3B shape (configs/pile/1.3b.yaml)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MB = 1e6


def per_layer_bytes(T: int, W: int, H: int, Dh: int, kv_heads: int) -> dict[str, float | None]:
    d, d_kv, n = H * Dh, kv_heads * Dh, T // W
    return {
        "lasp2_lightning": 2 * (W - 1) * H * (1 + Dh * Dh) * 4,
        "lasp2_gla": 2 * (W - 1) * H * (Dh // 2) * (1 + Dh) * 4,
        "lasp2_deltanet": 2 * (W - 1) * (H * 2 * Dh * Dh * 4 + 3 * 3 * d * 2),
        "lasp1_ring_linear": 2 * H * Dh * Dh * 4,
        "ulysses": 8 * (W - 1) / W * n * d * 2 if H % W == 0 and kv_heads % W == 0 else None,
        "lasp2h_attention": 2 * (W - 1) * n * 2 * d_kv * 2,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", default="1.3b")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--kv-heads", type=int, default=16)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--T", type=int, nargs="+", default=[32768, 131072, 524288])
    p.add_argument("--W", type=int, nargs="+", default=[8, 16, 64])
    args = p.parse_args()
    rows = []
    for T in args.T:
        for W in args.W:
            b = per_layer_bytes(T, W, args.heads, args.head_dim, args.kv_heads)
            rows.append({"T": T, "W": W, "tokens_per_rank": T // W, **b})
    shape = {"heads": args.heads, "head_dim": args.head_dim, "kv_heads": args.kv_heads, "layers": args.layers}
    out = Path(__file__).parent / "results" / f"sp_comm_{args.name}.json"
    note = "computed from the formulas in benchmarks/sp_comm.py, not measured; bytes per rank per layer"
    out.write_text(json.dumps({"note": note, "model": shape, "rows": rows}, indent=1) + "\n")
    fmt = lambda v: "n/a (H % W != 0)" if v is None else f"{v / MB:,.1f}"
    columns = {
        "lasp2_lightning": "LASP-2 lightning",
        "lasp2_gla": "LASP-2 GLA",
        "lasp2_deltanet": "LASP-2 DeltaNet",
        "lasp1_ring_linear": "LASP-1 ring (W−1 hops)",
        "ulysses": "Ulysses",
        "lasp2h_attention": "LASP-2H attention",
    }
    print("| T | W | T/W | " + " | ".join(columns.values()) + " |")
    print("|---|---|---|" + "---|" * len(columns))
    for r in rows:
        cells = [r[k] for k in columns]
        print(f"| {r['T']:,} | {r['W']} | {r['tokens_per_rank']:,} | " + " | ".join(map(fmt, cells)) + " |")
    print(
        f"\n(MB per rank per layer, forward + backward; x{args.layers} layers per sequence; written to {out})"
    )


if __name__ == "__main__":
    main()
