"""Each ablation checked against an explicit edit of the model, on the real embedded weights."""

from __future__ import annotations

import copy

import pytest
import torch

from ablate.ablations import Ablation, ablated, load_source_tensors
from ablate.anatomy import Anatomy
from conftest import greedy, logits, state_snapshot, without_layer


def decoder_layers(model):
    return Anatomy.of(model).blocks(model)


@pytest.mark.parametrize("layer", [0, 13, 29])
def test_layer_skip_equals_deleted_layer(model, batch, layer):
    pruned = without_layer(model, layer)
    with ablated(model, Ablation.parse(f"layer{layer}")):
        hooked_logits = logits(model, batch)
        hooked_tokens = greedy(model, batch)
    assert torch.equal(hooked_logits, logits(pruned, batch))
    assert torch.equal(hooked_tokens, greedy(pruned, batch))
    assert not torch.equal(hooked_logits, logits(model, batch)), "the skip changed nothing"


def test_head_silencing_equals_zeroed_o_proj_columns(model, batch):
    head_dim = model.config.head_dim  # by hand: the config's width
    layer, head = 7, 4
    edited = copy.deepcopy(model)
    o_proj = decoder_layers(edited)[layer].self_attn.o_proj
    with torch.no_grad():
        o_proj.weight[:, head * head_dim : (head + 1) * head_dim] = 0
    with ablated(model, Ablation.parse(f"head{layer}.{head}")):
        hooked = logits(model, batch)
    torch.testing.assert_close(hooked, logits(edited, batch), rtol=0, atol=1e-5)
    assert (hooked - logits(model, batch)).abs().max() > 1e-3


def test_gqa_single_head_touches_only_its_head(model, batch):
    anatomy = Anatomy.of(model)
    arch, head_dim = anatomy.arch, model.config.head_dim
    assert arch.num_kv_heads < arch.num_heads, "the embedded model must have real GQA"
    layer, head = 3, 1  # head 1 shares KV head 0 with heads 0 and 2
    captured = {}
    o_proj = decoder_layers(model)[layer].self_attn.o_proj
    handle = o_proj.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0].clone()))
    try:
        logits(model, batch)
        plain = captured.pop("x")
        with ablated(model, Ablation.parse(f"head{layer}.{head}")):
            logits(model, batch)
    finally:
        handle.remove()
    # The pre-hook we registered first sees the input before the ablation's own pre-hook.
    seen = captured["x"].view(*plain.shape[:-1], arch.num_heads, head_dim)
    assert torch.equal(seen, plain.view_as(seen))
    with ablated(model, Ablation.parse(f"head{layer}.{head}")):
        hooked_in = {}
        h2 = o_proj.register_forward_hook(lambda m, a, o: hooked_in.setdefault("x", a[0].clone()))
        try:
            logits(model, batch)
        finally:
            h2.remove()
    heads = hooked_in["x"].view_as(seen)
    assert torch.count_nonzero(heads[..., head, :]) == 0
    others = [h for h in range(arch.num_heads) if h != head]
    assert torch.equal(heads[..., others, :], plain.view_as(seen)[..., others, :])


def test_kv_group_silences_the_whole_group(model, batch):
    anatomy = Anatomy.of(model)
    arch, head_dim = anatomy.arch, model.config.head_dim
    layer, group = 5, 2
    edited = copy.deepcopy(model)
    o_proj = decoder_layers(edited)[layer].self_attn.o_proj
    heads = range(group * arch.heads_per_group, (group + 1) * arch.heads_per_group)
    with torch.no_grad():
        o_proj.weight[:, heads.start * head_dim : heads.stop * head_dim] = 0
    with ablated(model, Ablation.parse(f"kvgroup{layer}.{group}")):
        hooked = logits(model, batch)
    torch.testing.assert_close(hooked, logits(edited, batch), rtol=0, atol=1e-5)


@pytest.mark.parametrize("ablation_id", ["oproj4_from_demo", "oprojcum4_from_demo"])
def test_o_proj_replacement_equals_edited_weights(model, batch, perturbed_dir, ablation_id):
    ablation = Ablation.parse(ablation_id)
    source = load_source_tensors(perturbed_dir, Anatomy.of(model), [ablation])
    assert sorted(source) == sorted(
        f"model.layers.{layer}.self_attn.o_proj.weight" for layer in ablation.replaced_layers
    )
    edited = copy.deepcopy(model)
    with torch.no_grad():
        for key, weight in source.items():
            edited.get_parameter(key).copy_(weight)
    with ablated(model, ablation, source):
        hooked = logits(model, batch)
    assert torch.equal(hooked, logits(edited, batch))
    assert not torch.equal(hooked, logits(model, batch))


@pytest.mark.parametrize(
    "ablation_id",
    [
        "layer2",
        "head2.3",
        "kvgroup2.1",
        "oproj2_from_demo",
        "oprojcum2_from_demo",
        "layerswap2_from_demo",
        "layerswapcum2_from_demo",
    ],
)
def test_ablation_is_removed_cleanly(model, batch, perturbed_dir, ablation_id):
    ablation = Ablation.parse(ablation_id)
    source = load_source_tensors(perturbed_dir, Anatomy.of(model), [ablation])
    before_state, before_logits = state_snapshot(model), logits(model, batch)
    with ablated(model, ablation, source):
        logits(model, batch)
    after = state_snapshot(model)
    assert all(torch.equal(before_state[k], after[k]) for k in before_state)
    assert torch.equal(before_logits, logits(model, batch))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_removed_even_when_evaluation_fails(model):
    with pytest.raises(RuntimeError), ablated(model, Ablation.parse("layer1")):
        raise RuntimeError("evaluation crashed")
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize(
    ("ablation_id", "message"),
    [
        ("layer30", "layer 30 out of range 0..29"),
        ("head3.9", "head 9 out of range 0..8"),
        ("kvgroup3.3", "KV group 3 out of range 0..2"),
    ],
)
def test_out_of_range_units_are_rejected(model, ablation_id, message):
    with pytest.raises(ValueError, match=message), ablated(model, Ablation.parse(ablation_id)):
        pass


def test_ablation_ids_round_trip():
    for ablation_id in [
        "base",
        "layer12",
        "head35.4",
        "kvgroup8.1",
        "oproj3_from_a_b",
        "oprojcum0_from_x",
    ]:
        assert Ablation.parse(ablation_id).id == ablation_id
    with pytest.raises(ValueError, match="is not one of: base, layer"):
        Ablation.parse("layer-1")
