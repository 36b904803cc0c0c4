"""The proof (ablate.proof) on the cases that were silently wrong before it: each kind's
invariant decides, on the architecture itself, and a failure is one line naming the model type,
the kind and the invariant (tests/test_zoo.py runs it over every model type)."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from ablate.ablations import Ablation, ablated
from ablate.anatomy import Anatomy, UnsupportedModel
from ablate.config import ConfigError, check_proof, validate_config
from ablate.proof import Refused, check_units, prove_config, twins

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128)  # fmt: skip


def test_sublayers_of_a_family_that_adds_the_residual_itself_are_refused():
    """BLOOM's attention and MLP return residual + output: zeroing their output zeroes the
    residual stream, so the attn/mlp hooks are refused; the whole-layer skip holds."""
    proof = prove_config(T.BloomConfig(hidden_size=64, n_layer=3, n_head=4, vocab_size=128))
    with pytest.raises(Refused) as refused:
        proof.check("attn", "hook")
    assert str(refused.value).startswith(
        "bloom: attn (hook form): invariant 'attn and mlp removed == the block removed' fails"
    )
    proof.check("attn", "weight_edit")  # zeroed projections leave the residual: exact
    proof.check("layer", "hook")


def test_heads_of_a_family_with_two_head_widths_use_each_layers_width():
    """Gemma-4 gives sliding and full-attention layers different head widths: each layer's
    heads cover its own o_proj input, and a head silenced on a full-attention layer zeroes that
    layer's own columns (checked by hand)."""
    config = T.Gemma4TextConfig(**(SMALL | dict(head_dim=16, global_head_dim=32,
                                                 sliding_window=4, layer_types=[
        "sliding_attention", "full_attention", "sliding_attention"])))  # fmt: skip
    model, _, _ = twins(config)
    anatomy = Anatomy.of(model)
    outs = [block.get_submodule(anatomy.attention_out) for block in anatomy.blocks(model)]
    assert len({out.in_features for out in outs}) == 2
    assert [w * anatomy.arch.num_heads for w in anatomy.head_widths] == [
        out.in_features for out in outs
    ]
    proof = prove_config(config)
    for kind in ("head", "kv_group"):
        proof.check(kind, "hook")
        proof.check(kind, "weight_edit")
    width = outs[1].in_features // anatomy.arch.num_heads
    ids = torch.tensor([[5, 9, 13, 17, 21, 25, 29, 33]])
    edited = outs[1].weight.data.clone()
    edited[:, 3 * width : 4 * width] = 0
    original, outs[1].weight.data = outs[1].weight.data, edited
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    outs[1].weight.data = original
    with ablated(model, Ablation.parse("head1.3")), torch.no_grad():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_a_weight_edit_skip_beside_another_residual_writer_is_refused():
    """Gemma-4's per-layer input projection also writes the residual stream: zeroing o_proj and
    down_proj leaves it, so the weight-edit skip is refused while the hook skip holds."""
    config = T.Gemma4TextConfig(**(SMALL | dict(head_dim=16, hidden_size_per_layer_input=8,
                                                 vocab_size_per_layer_input=128)))  # fmt: skip
    proof = prove_config(config)
    proof.check("layer", "hook")
    with pytest.raises(Refused, match="invariant 'a removed block maps its input to itself'"):
        proof.check("layer", "weight_edit")


@pytest.mark.parametrize("first", ["attention", "mamba"])
def test_hybrids_are_refused_for_attention_kinds_whatever_their_first_layer(first):
    period = 2
    config = T.JambaConfig(**(SMALL | dict(num_hidden_layers=4, attn_layer_period=period,
        attn_layer_offset=0 if first == "attention" else 1, expert_layer_period=8,
        num_experts=1, mamba_d_state=4, mamba_dt_rank=4, use_mamba_kernels=False)))  # fmt: skip
    proof = prove_config(config)
    for kind in ("attn", "head", "oproj"):
        with pytest.raises(Refused, match="have no attention sublayer"):
            proof.check(kind, "hook")
    proof.check("layer", "hook")


def test_a_model_without_attention_is_refused_in_one_line():
    with pytest.raises(UnsupportedModel) as refused:
        prove_config(T.MambaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=64))
    assert "\n" not in str(refused.value) and str(refused.value).startswith("mamba: ")


@pytest.mark.parametrize("config_class", [T.MixtralConfig, T.Qwen3MoeConfig])
def test_a_layer_swap_the_source_checkpoint_cannot_give_is_refused_before_any_job(config_class):
    """MoE experts are fused on load, stored per expert: a swap reading the source checkpoint
    by the model's names would fail at job time; it is refused at the config check."""
    proof = prove_config(config_class(**(SMALL | dict(num_local_experts=4, num_experts=4,
                                                       num_experts_per_tok=2))))  # fmt: skip
    with pytest.raises(Refused, match="the source checkpoint does not store"):
        proof.check("layer_swap", "hook")
    proof.check("oproj", "hook")
    config = {
        "data_dir": "data",
        "models": {"moe": {"source": "embedded", "num_layers": 3, "num_heads": 4,
                           "num_kv_heads": 2},
                   "other": {"source": "embedded", "o_proj_noise": 0.5, "num_layers": 3,
                             "num_heads": 4, "num_kv_heads": 2}},
        "tasks": {"t": {"lm_eval_task": "kv_retrieval_short", "protocol": "loglikelihood"}},
        "figures": {"f": {"title": "swap", "ablation": {"kind": "layer_swap", "source": "other"},
                          "series": [{"label": "s", "model": "moe", "task": "t"}],
                          "panels": [{"metric": "acc"}]}},
    }  # fmt: skip
    validate_config(config)
    with pytest.raises(ConfigError) as refused:
        check_proof(config, "moe", proof.as_record())
    assert str(refused.value).startswith(
        "figures.f.panels[0].series.s: models.moe (" + proof.model_type + ") cannot be ablated "
        "by layer_swap in the hook form of its backend: the source checkpoint does not store"
    )


def test_the_job_start_check_refuses_a_failing_unit_before_scoring():
    """On the loaded model (here a BLOOM with its own weights), the chunk's units: a failing
    kind is refused in one line, and the sweep, which cannot run BLOOM's blocks, is off."""
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(
        T.BloomConfig(hidden_size=64, n_layer=3, n_head=4, vocab_size=128)
    ).eval()
    units = [Ablation.parse(u) for u in ("layer0", "layer2", "head1.0")]
    assert check_units(model, units, None) is not None  # the sweep is off, the units hold
    with pytest.raises(Refused, match=r"^bloom: attn \(hook form\): invariant"):
        check_units(model, [Ablation.parse("attn1")], None)
