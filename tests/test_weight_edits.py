"""The weight-edit form of every ablation (what the vLLM backend runs) against the hook form and
an explicitly pruned model, on the real embedded weights."""

from __future__ import annotations

import pytest
import torch

from ablate.ablations import (
    Ablation,
    WeightEdit,
    ablated,
    load_source_tensors,
    load_tensors,
    weight_edited,
    weight_edits,
)
from ablate.anatomy import Anatomy
from conftest import greedy, logits, state_snapshot, without_layer


def o_proj_key(layer: int) -> str:
    return f"model.layers.{layer}.self_attn.o_proj.weight"


@pytest.mark.parametrize("layer", [0, 13, 29])
def test_zeroed_o_proj_and_down_proj_equal_hook_and_deleted_layer(model, batch, layer):
    ablation = Ablation.parse(f"layer{layer}")
    with weight_edited(model, ablation):
        edited_logits, edited_tokens = logits(model, batch), greedy(model, batch)
    with ablated(model, ablation):
        hooked_logits, hooked_tokens = logits(model, batch), greedy(model, batch)
    pruned = without_layer(model, layer)
    # Bias-free blocks: a zeroed o_proj and down_proj add exactly 0 to the residual stream.
    assert torch.equal(edited_logits, hooked_logits)
    assert torch.equal(edited_logits, logits(pruned, batch))
    assert torch.equal(edited_tokens, hooked_tokens)
    assert torch.equal(edited_tokens, greedy(pruned, batch))
    assert not torch.equal(edited_logits, logits(model, batch))


@pytest.mark.parametrize("ablation_id", ["head7.4", "kvgroup5.2"])
def test_zeroed_o_proj_columns_equal_head_hooks(model, batch, ablation_id):
    ablation = Ablation.parse(ablation_id)
    with weight_edited(model, ablation):
        edited_logits, edited_tokens = logits(model, batch), greedy(model, batch)
    with ablated(model, ablation):
        hooked_logits, hooked_tokens = logits(model, batch), greedy(model, batch)
    # Zero input slice vs zero weight columns: the same sum, accumulated in another order.
    torch.testing.assert_close(edited_logits, hooked_logits, rtol=0, atol=1e-5)
    assert torch.equal(edited_tokens, hooked_tokens)
    assert (edited_logits - logits(model, batch)).abs().max() > 1e-3


@pytest.mark.parametrize("ablation_id", ["oproj4_from_demo", "oprojcum4_from_demo"])
def test_source_tensors_equal_o_proj_swap(model, batch, perturbed_dir, ablation_id):
    ablation = Ablation.parse(ablation_id)
    source = load_source_tensors(perturbed_dir, Anatomy.of(model), [ablation])
    by_key = load_tensors(perturbed_dir, map(o_proj_key, ablation.replaced_layers))
    assert source.keys() == by_key.keys()
    with weight_edited(model, ablation, by_key):
        edited = logits(model, batch)
    with ablated(model, ablation, source):
        swapped = logits(model, batch)
    assert torch.equal(edited, swapped)


@pytest.mark.parametrize(
    "ablation_id", ["layer2", "head2.3", "kvgroup2.1", "oproj2_from_demo", "oprojcum2_from_demo"]
)
def test_weight_edit_restores_bit_identical(model, batch, perturbed_dir, ablation_id):
    ablation = Ablation.parse(ablation_id)
    source = load_tensors(perturbed_dir, map(o_proj_key, ablation.replaced_layers))
    before_state, before_logits = state_snapshot(model), logits(model, batch)
    with weight_edited(model, ablation, source):
        assert not torch.equal(logits(model, batch), before_logits)
    after = state_snapshot(model)
    assert all(torch.equal(before_state[k], after[k]) for k in before_state)
    assert torch.equal(logits(model, batch), before_logits)


def test_weight_edits_of_each_kind(model):
    anatomy = Anatomy.of(model)
    assert weight_edits(Ablation.parse("base"), anatomy) == []
    assert weight_edits(Ablation.parse("layer3"), anatomy) == [
        WeightEdit("model.layers.3.self_attn.o_proj.weight"),
        WeightEdit("model.layers.3.mlp.down_proj.weight"),
    ]
    assert weight_edits(Ablation.parse("head3.4"), anatomy)[0].columns == (256, 320)
    assert weight_edits(Ablation.parse("kvgroup3.1"), anatomy)[0].columns == (192, 384)
    cumulative = weight_edits(Ablation.parse("oprojcum2_from_x"), anatomy)
    assert [e.key for e in cumulative] == [o_proj_key(layer) for layer in range(3)]
    assert all(e.from_source for e in cumulative)


def test_weight_edits_refused_where_not_exact(tmp_path):
    """A post-LN block (OPT-350m's do_layer_norm_before: false) normalizes the residual stream
    after the add, so zeroed projections are not a skipped layer: refused in one line; a
    checkpoint that stores a tensor under another name is refused before vLLM starts."""
    from transformers import OPTConfig, OPTForCausalLM

    from ablate.ablations import check_weight_edits_exact, checkpoint_keys

    config = OPTConfig(
        vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=32, do_layer_norm_before=False,
    )  # fmt: skip
    model = OPTForCausalLM(config)
    with pytest.raises(ValueError, match=r"^layer1: opt normalizes the residual stream after"):
        weight_edited(model, Ablation.parse("layer1")).__enter__()
    anatomy = Anatomy.of(model)
    model.save_pretrained(tmp_path)
    keys = checkpoint_keys(tmp_path)
    assert check_weight_edits_exact(Ablation.parse("head1.2"), anatomy, keys)
    renamed = {key.replace("out_proj", "o") for key in keys}
    with pytest.raises(
        ValueError, match=r"^head1.2: no tensor .*out_proj.weight in the checkpoint"
    ):
        check_weight_edits_exact(Ablation.parse("head1.2"), anatomy, renamed)


def test_probe_report_check():
    from ablate.backends.vllm import EditNotApplied, check_report

    check_report({"m": (2e-7, 0.8), "n": (0.0, float("inf"))}, "float32", "layer3")
    for report in ({"m": (0.8, 0.0)}, {"m": (2e-3, 0.8)}, {"m": (1e-6, 1e-6)}):
        with pytest.raises(EditNotApplied, match="layer3: m still computes with the wrong weight"):
            check_report(report, "float32", "layer3")
    check_report({"m": (1e-2, 0.3)}, "bfloat16", "layer3")  # bf16 matmul noise is allowed
