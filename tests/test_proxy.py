"""Layer-importance proxies checked against hidden states computed directly, on the embedded model."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
import torch

from ablate.anatomy import Anatomy
from ablate.proxy import layer_proxies, prompt_batches

PROMPTS = [
    "The capital of France is Paris. The capital of Italy is",
    "2 + 2 =",
    "Key: 7f3a. Value: banana. What is the value of key 7f3a?",
]


def direct_proxies(model, tokenizer) -> pd.DataFrame:
    """Per-token cosines from ``output_hidden_states`` of each unpadded prompt.

    ``hidden_states[l]`` is layer l's input and ``hidden_states[l + 1]`` its output, except for
    the last layer, whose output HF returns after the final norm: that one comes from a hook.
    """
    layers = Anatomy.of(model).blocks(model)
    last_output = {}
    handle = layers[-1].register_forward_hook(lambda m, a, out: last_output.update(h=out))
    cosines = [[] for _ in layers]
    try:
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                hidden = model(ids, output_hidden_states=True).hidden_states
            outputs = [*hidden[1 : len(layers)], last_output["h"]]
            for index, (h_in, h_out) in enumerate(zip(hidden[: len(layers)], outputs, strict=True)):
                cos = torch.nn.functional.cosine_similarity(h_in.double(), h_out.double(), dim=-1)
                cosines[index].append(cos.flatten())
    finally:
        handle.remove()
    cos = [torch.cat(values) for values in cosines]
    return pd.DataFrame(
        {
            "layer": range(len(layers)),
            "block_influence": [float(1 - c.mean()) for c in cos],
            "angular_distance": [float(torch.arccos(c.clamp(-1, 1)).mean() / math.pi) for c in cos],
        }
    )


def test_proxies_match_hidden_states(model, tokenizer):
    proxies = layer_proxies(model, prompt_batches(tokenizer, PROMPTS, batch_size=1, max_length=64))
    expected = direct_proxies(model, tokenizer)
    assert list(proxies.columns) == [
        "layer",
        "block_influence",
        "angular_distance",
        "attn_block_influence",
        "attn_angular_distance",
        "mlp_block_influence",
        "mlp_angular_distance",
    ]  # fmt: skip (the sublayer columns: tests/test_sublayers.py)
    assert len(proxies) == len(Anatomy.of(model).blocks(model)) == 30
    pd.testing.assert_frame_equal(
        proxies[expected.columns], expected, check_exact=False, rtol=0, atol=1e-5
    )
    assert (proxies["block_influence"] > 0).all() and (proxies["angular_distance"] < 1).all()


def test_padding_is_excluded(model, tokenizer):
    (input_ids, attention_mask), *rest = prompt_batches(tokenizer, PROMPTS, 3, max_length=64)
    assert not rest
    lengths = attention_mask.sum(dim=1)
    assert lengths.min() < input_ids.shape[1], "the batch must contain padding"
    assert all(attention_mask[row, : int(n)].all() for row, n in enumerate(lengths))  # right-padded
    padded = layer_proxies(model, [(input_ids, attention_mask)])
    single = layer_proxies(model, prompt_batches(tokenizer, PROMPTS, 1, max_length=64))
    pd.testing.assert_frame_equal(padded, single, check_exact=False, rtol=0, atol=1e-5)
    unmasked = layer_proxies(model, [(input_ids, torch.ones_like(attention_mask))])
    assert not np.allclose(unmasked["block_influence"], single["block_influence"], atol=1e-5)


def test_prompt_batches_truncate(tokenizer):
    batches = list(prompt_batches(tokenizer, PROMPTS, batch_size=2, max_length=4))
    assert [ids.shape[0] for ids, _ in batches] == [2, 1]
    assert all(ids.shape[1] <= 4 and mask.shape == ids.shape for ids, mask in batches)


def test_block_distances_are_gromovs_at_the_last_token(model, tokenizer):
    """Angular distance between layer l's input and layer l + n's, at each prompt's last token
    (padded batch of two prompts of different lengths), against unpadded hidden states."""
    from ablate.proxy import block_distances

    layers = Anatomy.of(model).blocks(model)
    last_output = {}
    handle = layers[-1].register_forward_hook(lambda m, a, out: last_output.update(h=out))
    states = []
    try:
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                hidden = model(ids, output_hidden_states=True).hidden_states
            states.append([h[0, -1].double() for h in (*hidden[: len(layers)], last_output["h"])])
    finally:
        handle.remove()
    frame = block_distances(model, prompt_batches(tokenizer, PROMPTS, 2, 64))
    assert len(frame) == len(layers) * (len(layers) + 1) // 2
    for start, size in [(0, 1), (3, 7), (0, len(layers)), (len(layers) - 1, 1)]:
        expected = np.mean([
            math.acos(max(-1.0, min(1.0, float(torch.nn.functional.cosine_similarity(
                s[start], s[start + size], dim=0))))) / math.pi
            for s in states
        ])  # fmt: skip
        row = frame[(frame["start"] == start) & (frame["size"] == size)]
        assert float(row["angular_distance"].iloc[0]) == pytest.approx(expected, abs=1e-6)


def test_proxy_orders_pick_the_least_influential_layers_and_the_closest_block():
    from ablate.ablations import Ablation, removal_units, resolved

    influence = [0.5, 0.1, 0.3, 0.05, 0.2]
    distance = {(start, size): abs(start - 2) + size for size in range(1, 6)
                for start in range(6 - size)}  # fmt: skip
    by_influence = [resolved(Ablation.parse(f"drop{n}_by_block_influence"), influence, distance)
                    for n in (1, 2, 3)]  # fmt: skip
    assert [u.id for u in by_influence] == ["layers3", "layers1+3", "layers1+3+4"]
    block = resolved(Ablation.parse("drop2_by_angular_block"), influence, distance)
    assert block.id == "layers2+3"
    # Random draws are seeded permutations: nested sets, the same on every run.
    units = removal_units({"order": "random", "removed": [1, 2, 3], "seeds": [7]}, 5)
    assert [set(u.layers) < set(v.layers) for u, v in itertools.pairwise(units)] == [True, True]
    assert units == removal_units({"order": "random", "removed": [1, 2, 3], "seeds": [7]}, 5)


def write_proxy_files(folder, influence):
    """The baseline's two proxy files for a model of len(influence) layers."""
    count = len(influence)
    pd.DataFrame({"layer": range(count), "block_influence": influence}).to_csv(
        folder / "proxies.csv", index=False
    )
    blocks = [{"start": s, "size": n, "angular_distance": 0.1 * n + 0.01 * s}
              for n in range(1, count + 1) for s in range(count - n + 1)]  # fmt: skip
    pd.DataFrame(blocks).to_csv(folder / "angular_blocks.csv", index=False)


def test_proxy_files_are_read_by_column_and_refused_when_truncated(tmp_path):
    """Layers 17 and 25 are the least influential of 30: shuffled rows pick them too; a file cut
    mid-row, a row deleted in the middle or a non-number is refused in one line (before, a
    truncated file picked layers 3 and 2+3 and the workflow exited 0)."""
    from ablate.ablations import Ablation
    from ablate.proxy import resolved_units

    influence = [0.5 + 0.01 * layer for layer in range(30)]
    influence[17], influence[25] = 0.01, 0.02
    write_proxy_files(tmp_path, influence)
    units = [Ablation.parse("drop1_by_block_influence"), Ablation.parse("drop2_by_block_influence")]
    expected = ["layers17", "layers17+25"]
    assert [u.id for u in resolved_units(units, tmp_path, 30)] == expected
    proxies = tmp_path / "proxies.csv"
    lines = proxies.read_text().splitlines()
    proxies.write_text("\n".join([lines[0], *reversed(lines[1:])]) + "\n")
    assert [u.id for u in resolved_units(units, tmp_path, 30)] == expected
    broken = {
        "cut mid-row": "\n".join(lines[:11]) + "\n11,0.6",
        "a row deleted": "\n".join(lines[:5] + lines[6:]) + "\n",
        "not a number": "\n".join([*lines[:3], "2,abc", *lines[4:]]) + "\n",
    }
    for case, text in broken.items():
        proxies.write_text(text)
        with pytest.raises(ValueError) as refused:
            resolved_units(units, tmp_path, 30)
        message = str(refused.value)
        assert message.startswith(f"{proxies}: ") and "\n" not in message, case
        assert "delete the baseline's folder and rerun" in message, case
