"""Cross-layer KV sharing as a per-layer choice (issue 24): the pruning section's
``kv_sharing``, the HF reference, and the cost model (a sharing layer stores no KV)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from harp_vllm.errors import UserError
from harp_vllm.spec import PruningSpec

SMOL = SimpleNamespace(hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                       head_dim=64, intermediate_size=1536, num_hidden_layers=30,
                       vocab_size=49152, max_position_embeddings=8192)


def _escape(message: str) -> str:
    return message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace(
        "]", r"\]").replace(".", r"\.")


# ---------------------------------------------------------------------------- the spec


def test_sharing_round_trip_and_version():
    spec = PruningSpec(layers={0: 0.0}, windows={1: 64, 4: 64}, kv_sharing={4: 1, 3: 2})
    d = spec.to_dict()
    assert d["version"] == 4 and d["kv_sharing"] == {"3": 2, "4": 1}
    back = PruningSpec.from_dict(d, num_layers=8)
    assert back.kv_sharing == {3: 2, 4: 1} and back.windows == {1: 64, 4: 64}
    assert back.kv_heads(8, 3) == [0, 3, 3, 0, 0, 3, 3, 3]  # sharing layers store no KV
    # no sharing: the older versions are still written (and read)
    assert PruningSpec(layers={}, windows={1: 64}).to_dict()["version"] == 3
    assert "kv_sharing" not in PruningSpec(layers={2: 0.5}).to_dict()
    for version in (1, 2, 3):
        assert PruningSpec.from_dict({"version": version, "layers": {"2": 0.5}}).kv_sharing == {}


SHAPES = {"num_attention_heads": [4] * 6, "num_key_value_heads": [2, 2, 1, 2, 1, 2],
          "intermediate_size": [256] * 6}


@pytest.mark.parametrize("section, message", [
    ({"version": 3, "layers": {}, "kv_sharing": {"3": 1}}, "needs 'harp_pruning.version' 4"),
    ({"version": 4, "layers": {}, "kv_sharing": [1]}, "must be an object"),
    ({"version": 4, "layers": {}, "kv_sharing": {"3": "1"}}, "must be a layer index"),
    ({"version": 4, "layers": {}, "kv_sharing": {"9": 1}}, "layer index 9 out of range"),
    ({"version": 4, "layers": {}, "kv_sharing": {"3": 7}}, "layer index 7 out of range"),
    # the target must come earlier
    ({"version": 4, "layers": {}, "kv_sharing": {"3": 3}},
     "'harp_pruning.kv_sharing'[3] is 3: layer 3 can only share the KV cache of an earlier "
     "layer (0..2)"),
    ({"version": 4, "layers": {}, "kv_sharing": {"2": 4}},
     "layer 2 can only share the KV cache of an earlier layer"),
    # the target has its own attention
    ({"version": 4, "layers": {"1": 0.5}, "kv_sharing": {"3": 1}},
     "layer 1 has no KV cache to share: it is pruned"),
    ({"version": 4, "layers": {"1": 0.0}, "kv_sharing": {"3": 1}},
     "layer 1 has no KV cache to share: it is pruned"),
    ({"version": 4, "layers": {}, "maps": {"1": {"input": "normed", "rank": None}},
      "kv_sharing": {"3": 1}}, "layer 1 has no KV cache to share: it is replaced by a linear"),
    # no chains
    ({"version": 4, "layers": {}, "kv_sharing": {"3": 1, "5": 3}},
     "layer 3 itself shares layer 1's KV cache (no chains: point layer 5 at 1)"),
    # the same kind: window and KV heads
    ({"version": 4, "layers": {}, "windows": {"3": 64}, "kv_sharing": {"3": 1}},
     "a layer of another kind: layer 3 has window 64, layer 1 None"),
    ({"version": 4, "layers": {}, "windows": {"1": 64, "3": 32}, "kv_sharing": {"3": 1}},
     "layer 3 has window 32, layer 1 64"),
    ({"version": 4, "layers": {}, "shapes": SHAPES, "kv_sharing": {"3": 2}},
     "a layer of another kind: layer 3 has 2 KV heads, layer 2 1"),
    # the sharing layer has attention of its own
    ({"version": 4, "layers": {"3": 0.0}, "kv_sharing": {"3": 1}},
     "layer 3 is in 'harp_pruning.kv_sharing' but it is pruned"),
    ({"version": 4, "layers": {}, "maps": {"3": {"input": "raw", "rank": 8}},
      "kv_sharing": {"3": 1}}, "layer 3 is in 'harp_pruning.kv_sharing' but it is replaced"),
    ({"version": 4, "layers": {}, "shapes": SHAPES, "maps": {"3": {"input": "normed",
                                                                 "rank": 8, "add": True}},
      "kv_sharing": {"3": 1}}, "but it has a map added to its attention"),
])
def test_bad_sharing_is_refused(section, message):
    with pytest.raises(UserError, match=_escape(message)):
        PruningSpec.from_dict(section, num_layers=6)


def test_sharing_of_the_same_kind_is_accepted():
    spec = PruningSpec.from_dict(
        {"version": 4, "layers": {"0": 0.0}, "shapes": SHAPES,
         "windows": {"2": 16, "4": 16}, "kv_sharing": {"4": 2, "3": 1, "5": 1}}, num_layers=6)
    assert spec.kv_sharing == {3: 1, 4: 2, 5: 1}  # one target may serve several layers


def test_sharing_on_a_family_without_support_is_refused():
    from harp_vllm.families import SHARING_MODEL_TYPES

    assert set(SHARING_MODEL_TYPES) == {"llama", "mistral"}
