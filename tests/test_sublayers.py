"""Sublayer ablations (attention alone, MLP alone) on the real embedded weights: the hook, the
exact weight edit and a model whose sublayer is removed by hand agree, restore bit-identically,
and attention + MLP of one layer is that layer's skip."""

from __future__ import annotations

import math

import pytest
import torch

import families
from ablate.ablations import Ablation, ablated, weight_edited
from ablate.anatomy import Anatomy
from ablate.proxy import layer_proxies, prompt_batches
from conftest import PROMPT, greedy, logits, state_snapshot


def without_sublayer(model, kind: str, layer: int):
    return families.without_sublayer(model, Anatomy.of(model), kind, layer)


@pytest.mark.parametrize("kind", ["attn", "mlp"])
@pytest.mark.parametrize("layer", [0, 13, 29])
def test_hook_equals_weight_edit_equals_removed_sublayer(model, batch, kind, layer):
    ablation = Ablation.parse(f"{kind}{layer}")
    before = state_snapshot(model)
    base_logits = logits(model, batch)
    with ablated(model, ablation):
        hooked_logits, hooked_tokens = logits(model, batch), greedy(model, batch)
    with weight_edited(model, ablation):
        edited_logits, edited_tokens = logits(model, batch), greedy(model, batch)
    removed = without_sublayer(model, kind, layer)
    # Bias-free projections: a zeroed o_proj / down_proj adds exactly 0, as the hook does.
    assert torch.equal(hooked_logits, edited_logits)
    assert torch.equal(hooked_logits, logits(removed, batch))
    assert torch.equal(hooked_tokens, edited_tokens)
    assert torch.equal(hooked_tokens, greedy(removed, batch))
    assert (hooked_logits - base_logits).abs().max() > 1e-3
    # Both forms are undone exactly.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(logits(model, batch), base_logits)


@pytest.mark.parametrize("layer", [0, 13, 29])
def test_attention_and_mlp_of_a_layer_are_its_skip(model, batch, layer):
    with ablated(model, Ablation.parse(f"attn{layer}")), ablated(model, Ablation("mlp", layer)):
        both = logits(model, batch)
    with ablated(model, Ablation.parse(f"layer{layer}")):
        assert torch.equal(both, logits(model, batch))


def layer_io(model, tokenizer, prompts, layer: int, ablation: Ablation) -> list[tuple]:
    """(input, output) of decoder layer ``layer`` per prompt, under ``ablation``."""
    seen = []

    def keep(module, args, kwargs, output):
        seen.append((args[0] if args else kwargs["hidden_states"], output))

    handle = Anatomy.of(model).blocks(model)[layer].register_forward_hook(keep, with_kwargs=True)
    try:
        with torch.no_grad(), ablated(model, ablation):
            for prompt in prompts:
                model(**tokenizer(prompt, return_tensors="pt"))
    finally:
        handle.remove()
    return seen


def measures(pairs) -> list[float]:
    """Block influence and angular distance over every token of (before, after) pairs."""
    cos = torch.cat([
        torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).flatten()
        for a, b in pairs
    ])  # fmt: skip
    return [float(1 - cos.mean()), float((torch.arccos(cos.clamp(-1, 1)) / math.pi).mean())]


def test_sublayer_proxies_compare_the_residual_around_each_sublayer(model, tokenizer):
    """attn_*: a layer's input against its output with its MLP removed (input + attention);
    mlp_*: that against the layer's real output. Computed here through the ablation hooks."""
    prompts = [PROMPT, "The capital of France is"]
    proxies = layer_proxies(model, prompt_batches(tokenizer, prompts, 2, 64)).set_index("layer")
    for layer in (0, 13, 29):
        mid = layer_io(model, tokenizer, prompts, layer, Ablation("mlp", layer))
        out = layer_io(model, tokenizer, prompts, layer, Ablation("base"))
        row = proxies.loc[layer]
        attn = measures(mid)
        mlp = measures((h_mid, h_out) for (_, h_mid), (_, h_out) in zip(mid, out, strict=True))
        assert row[["attn_block_influence", "attn_angular_distance"]].tolist() == pytest.approx(
            attn, abs=1e-6
        )
        assert row[["mlp_block_influence", "mlp_angular_distance"]].tolist() == pytest.approx(
            mlp, abs=1e-6
        )
        assert measures(out) == pytest.approx(
            row[["block_influence", "angular_distance"]].tolist(), abs=1e-6
        )
