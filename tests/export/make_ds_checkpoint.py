"""Run in a fresh process by the export tests: train one step with DeepSpeed (one process, gloo) and save
a checkpoint laid out as the trainer does, for each ZeRO stage asked for.

    python make_ds_checkpoint.py ROOT PORT STAGE [STAGE ...]

ROOT/config.yaml is the run config; ROOT/tokenizer (optional) is copied into each tag. For stage S
this writes the run directory ROOT/stageS (config.yaml, checkpoints/latest, checkpoints/step_00000001/)
and ROOT/stageS/reference.pt (the trained weights, gathered, fp32).
"""

import os
import shutil
import sys
from pathlib import Path


def main() -> None:
    root, port, stages = Path(sys.argv[1]), sys.argv[2], [int(s) for s in sys.argv[3:]]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    import deepspeed
    import torch
    import torch.nn.functional as F

    from lmstack.config import load_config
    from lmstack.model import LM

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no C++ JIT build
    deepspeed.init_distributed(dist_backend="gloo")
    config = load_config(root / "config.yaml")
    for stage in stages:
        torch.manual_seed(stage)
        model = LM(config.model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        ds_config = {
            "train_micro_batch_size_per_gpu": 2,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage},
        }
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        ids = torch.randint(0, config.model.vocab_size, (2, 16))
        logits = engine(ids).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        engine.backward(loss)
        engine.step()
        run = root / f"stage{stage}"
        run.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / "config.yaml", run / "config.yaml")
        tag = "step_00000001"
        engine.save_checkpoint(str(run / "checkpoints"), tag=tag)
        shutil.copy(root / "config.yaml", run / "checkpoints" / tag / "config.yaml")
        if (root / "tokenizer").is_dir():
            shutil.copytree(root / "tokenizer", run / "checkpoints" / tag / "tokenizer")
        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
            reference = {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}
        torch.save(reference, run / "reference.pt")
        engine.destroy()


if __name__ == "__main__":
    main()
