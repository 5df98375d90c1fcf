"""`pile`: the Pile's jsonl.zst shards ({"text", "meta": {"pile_set_name"}}), read as `jsonl` is,
with `subsets` picking the Pile's subsets by name."""

from __future__ import annotations

from lmstack.data.sources import register
from lmstack.data.sources.jsonl import JsonlSource


@register("pile")
class PileSource(JsonlSource):
    pass
