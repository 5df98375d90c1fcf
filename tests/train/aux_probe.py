"""A test-only mixer that emits an auxiliary loss and a statistic, to prove the aux path end to end.

`probe`: y = W x per token (no mixing along T, no state), aux = {"probe_loss": mean(y²) (a loss,
default coefficient 1), "probe_stat": mean|x| (a statistic, only logged)}. Registered on demand so
that the registry of other tests stays the real one."""

from __future__ import annotations

from torch import nn

from lmstack.model.mixers import MIXERS, MixerOutput, TokenMixer, register


class AuxProbe(TokenMixer):
    aux_losses = {"probe_loss": 1.0}

    def __init__(self, config, layer_idx, options) -> None:
        super().__init__(config, layer_idx, options)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x, context, state=None, use_cache=False) -> MixerOutput:
        y = self.proj(x)
        aux = {"probe_loss": y.float().pow(2).mean(), "probe_stat": x.detach().float().abs().mean()}
        return MixerOutput(y, None, aux)

    def flops_per_token(self, seq_len: int) -> float:
        return 2.0 * self.config.d_model**2


def register_probe() -> None:
    if "probe" not in MIXERS:
        register("probe")(AuxProbe)


def unregister_probe() -> None:
    MIXERS.pop("probe", None)
