"""A tiny random-weight twin of a model, from its config alone: the model's own module classes
and layer-type pattern at a few features per head, built in milliseconds on a login node. The
ablation proof (:mod:`ablate.proof`) runs on it before any job, since every invariant it checks
depends on the architecture's structure, not on the trained weights.

Shrinking is by name, over the settings families give widths: the per-head width, the hidden
size (heads x per-head width), every FFN and expert width, expert counts and low-rank sizes. The
depth is cut to the shortest prefix whose blocks show every distinct block structure of the full
model (every per-layer config list cut to match), unless the cut model's blocks differ from the
full model's first blocks, in which case the twin keeps the full depth.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

HEAD_WIDTH = 8  # features per head in the twin (even: rotary embeddings need pairs)
FFN_WIDTH = 32
LOW_RANK_KEYS = ("kv_lora_rank", "q_lora_rank")
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
EXPERTS_PER_TOKEN_KEYS = ("num_experts_per_tok", "moe_topk", "num_experts_per_token")
GROUP_KEYS = ("n_group", "topk_group")
VOCAB = 512  # token ids past it (special tokens) are moved to its end, above the probe's ids


def _is_head_width(name: str) -> bool:
    """One head's width, or a rotary part of it (MLA's and linear attention's widths too)."""
    return name.endswith("head_dim") or name == "rotary_dim"


def _is_state_size(name: str) -> bool:
    """A state-space layer's state width or scan chunk (its cost grows with their product)."""
    return name.endswith(("d_state", "state_size")) or name.endswith("_chunk_size")


def _is_ffn_width(name: str) -> bool:
    return name.endswith("intermediate_size") or name in ("ffn_dim", "n_inner", "d_ff")


def _get(config, name: str) -> Any:
    """A setting as stored, under its own or its family's name (GPT-2's n_embd for
    hidden_size): a per-layer setting may refuse a global read."""
    return vars(config).get(getattr(config, "attribute_map", {}).get(name, name))


def _set(config, name: str, value: int) -> None:
    """Set an integer setting (or each entry of a per-layer list of them), if the config
    stores one under that name."""
    current = _get(config, name)
    if isinstance(current, list) and all(isinstance(v, int) for v in current):
        value = [value] * len(current)  # type: ignore[assignment]
    elif not isinstance(current, int) or isinstance(current, bool):
        return
    with contextlib.suppress(AttributeError):  # a derived setting (a property)
        setattr(config, name, value)


def _shrink_vocabulary(config) -> None:
    """Every vocabulary size to at most VOCAB, and token ids beyond it to distinct ids at its
    end (for each config of a wrapper: its text, vision and other sub-configs alike)."""
    spare = iter(range(VOCAB - 1, VOCAB // 2, -1))
    moved: dict[int, int] = {}

    def inside(token):
        if isinstance(token, int) and not isinstance(token, bool) and token >= VOCAB:
            return moved.setdefault(token, next(spare))
        return token

    for name, value in list(vars(config).items()):
        if "vocab_size" in name and isinstance(value, int) and value > VOCAB:
            _set(config, name, VOCAB)
        elif name.endswith(("token_id", "token_ids", "token_index")):
            new = [inside(t) for t in value] if isinstance(value, list) else inside(value)
            with contextlib.suppress(AttributeError):
                setattr(config, name, new)
        elif hasattr(value, "to_dict") and hasattr(value, "model_type"):  # a sub-config
            _shrink_vocabulary(value)


def shrunk(config, heads_too: bool = True):
    """A copy of ``config`` with its vocabulary, FFN widths and expert counts shrunk, and (with
    ``heads_too``) its per-head width and hidden size."""
    config = copy.deepcopy(config)
    _shrink_vocabulary(config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = _get(text, "num_attention_heads")
    if heads_too:
        for name in [n for n in vars(text) if _is_head_width(n)]:
            _set(text, name, HEAD_WIDTH)
        for name in LOW_RANK_KEYS:
            _set(text, name, 2 * HEAD_WIDTH)
        if isinstance(heads, int) and heads > 0:
            _set(text, "hidden_size", heads * HEAD_WIDTH)
    for name in list(vars(text)):
        if _is_ffn_width(name):
            _set(text, name, FFN_WIDTH)
        elif _is_state_size(name):
            _set(text, name, 16)
    for name in getattr(config, "sub_configs", {}):  # towers beside the decoder: one layer
        sub = getattr(config, name, None)
        if sub is not None and sub is not text:
            for depth in ("num_hidden_layers", "num_blocks"):
                _set(sub, depth, 1)
    for name in EXPERT_COUNT_KEYS:
        if isinstance(_get(text, name), int) and _get(text, name) > 4:
            _set(text, name, 4)
    for name in EXPERTS_PER_TOKEN_KEYS:
        if isinstance(_get(text, name), int) and _get(text, name) > 2:
            _set(text, name, 2)
    for name in GROUP_KEYS:
        _set(text, name, 1)
    return config


def block_structure(model, blocks) -> list[tuple]:
    """Per block: its modules' names and classes, and the attention type the config gives it."""
    text = model.config.get_text_config()
    types = getattr(text, "layer_types", None) or [None] * len(blocks)
    return [
        (tuple((name, type(module).__name__) for name, module in block.named_modules()), kind)
        for block, kind in zip(blocks, types, strict=False)
    ]


def _cut_depth(config, depth: int):
    """``config`` with ``depth`` layers: every per-layer list (one entry per layer) cut too,
    where it is a setting (a list derived from others follows them)."""
    config = copy.deepcopy(config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = text.num_hidden_layers
    settings = dict(vars(text))
    if getattr(text, "layer_types", None) is not None:  # a setting, or derived from one
        settings["layer_types"] = text.layer_types
    for name, value in settings.items():
        if isinstance(value, list | tuple) and len(value) == layers:
            with contextlib.suppress(AttributeError):
                setattr(text, name, type(value)(value[:depth]))
    text.num_hidden_layers = depth
    return config


def twin_config(config, blocks_of, heads_too: bool = True) -> Any:
    """The twin's config: widths shrunk, and depth cut where the blocks' structures allow.
    ``blocks_of(model)`` gives a model's decoder block list (ablate.anatomy)."""
    import torch
    from transformers import AutoModelForCausalLM

    narrow = shrunk(config, heads_too)
    with torch.device("meta"):
        full = AutoModelForCausalLM.from_config(narrow)
    structure = block_structure(full, blocks_of(full))
    seen: set = set()
    depth = 0
    for depth, signature in enumerate(structure, start=1):  # noqa: B007 (the prefix length)
        seen.add(signature)
        if len(seen) == len(set(structure)):
            break
    depth = max(depth, min(2, len(structure)))
    if depth == len(structure):
        return narrow
    try:
        cut = _cut_depth(narrow, depth)
        with torch.device("meta"):
            short = AutoModelForCausalLM.from_config(cut)
        if hasattr(cut, "validate"):  # the family's own checks, as saving runs them
            cut.validate()
    except Exception:  # a per-layer setting the cut did not see: keep every layer
        return narrow
    return cut if block_structure(short, blocks_of(short)) == structure[:depth] else narrow


def build_twin(config, blocks_of, seed: int = 0, attn_implementation: str = "sdpa"):
    """The twin in float32, eval mode, weights from ``seed``: biases and 1-d weights random
    too (around 1 for norms), so that each one matters to the proof. Where the family's code
    ties a setting to the head width (a rotary width, a fixed section split), the twin keeps
    the model's head width and hidden size. ``blocks_of(model)``: its decoder block list."""
    try:
        return _built(twin_config(config, blocks_of), seed, attn_implementation)
    except Exception:  # retried below, and that error is the one raised
        return _built(twin_config(config, blocks_of, heads_too=False), seed, attn_implementation)


def _built(config, seed: int, attn_implementation: str):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.float32, attn_implementation=attn_implementation
        )
    except ValueError:  # a family without that kernel: its eager attention
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.float32, attn_implementation="eager"
        )
    model.eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or parameter.dim() == 1:
                parameter.normal_(0, 0.2).add_(1.0 if "norm" in name else 0.0)
        model(input_ids=torch.arange(3, 13)[None], use_cache=False)  # it runs at all
    return model
