"""In-process ablations of a loaded decoder LLM, as reversible hooks and weight swaps.

This module owns the ablation vocabulary: the config's kinds, their ids, the units a figure's
spec sweeps, and both forms of each ablation (hooks, exact weight edits). An ablation is named by
a short id that is also its results folder (config kind in brackets):

===========================  ==================================================================
``base``                     the unablated model
``layer{L}``                 [layer] skip decoder layer L (its output is its input)
``attn{L}``                  [attn] layer L's attention sublayer adds nothing to the residual
``mlp{L}``                   [mlp] layer L's MLP sublayer adds nothing to the residual
``head{L}.{H}``              [head] silence query head H of layer L (its o_proj input slice is 0)
``kvgroup{L}.{G}``           [kv_group] silence every query head reading KV head G of layer L
``oproj{L}_from_{M}``        [oproj] layer L's ``self_attn.o_proj`` weight taken from model M
``oprojcum{L}_from_{M}``     [oproj_cumulative] ``self_attn.o_proj`` of layers 0..L from model M
``layerswap{L}_from_{M}``    [layer_swap] every tensor of decoder layer L taken from model M
``layerswapcum{L}_from_{M}`` [layer_swap_cumulative] every tensor of layers 0..L from model M
``layers{A}+{B}+...``        [layer_set] skip every layer of the set (a multi-layer removal)
``drop{N}_by_{ORDER}``       [layer_set] the N layers an order of the model's own baseline
                             proxies picks (block_influence, angular_block), resolved from the
                             baseline's files when the unit runs (:func:`resolved`)
===========================  ==================================================================

A ``layer_set`` sweep removes n = 1, 2, ... layers in an order (config ``order``): ShortGPT's
``block_influence`` (the n layers of lowest block influence), Gromov et al.'s ``angular_block``
(the contiguous n layers whose input and output are closest in angle, at the last token),
``random`` (a seeded permutation per draw) or ``explicit`` (the config's list, first n).

The paper's text replaces ``o_proj`` (its W_o); its released ``layer_change.py`` swaps whole
decoder layers. Both are kinds here, so a figure can draw one beside the other.

Layer and head indices are 0-based, in the text decoder's block list. ``o_proj`` stands for
the projection writing a block's attention output into the residual stream (GPT-NeoX
``attention.dense``, GPT-2 ``attn.c_proj``, OPT ``out_proj``...); :mod:`ablate.anatomy` names the
modules of each family.

Every ablation also has an exact weight-edit form (:func:`weight_edits`), for engines where hooks
cannot reach the forward pass (vLLM): a skipped layer's attention and MLP output projections are
zeroed, weights and biases (every expert's in a mixture of experts), so the block adds exactly 0
to the residual stream (``attn``/``mlp`` zero one of the two); a silenced head's input features
of ``o_proj`` are zeroed (its bias stays, as under the hook); a replaced ``o_proj`` weight (or a
swapped layer's every tensor) is the source's tensor.
"""

from __future__ import annotations

import contextlib
import random
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ablate.anatomy import Anatomy, Architecture

if TYPE_CHECKING:  # torch is imported where a model is touched: the vocabulary needs none
    import torch
    from torch import nn

# The vocabulary of ablation kinds, owned here: the config's ``ablation.kind`` names and the id
# prefix of each (the id is also the unit's results folder). paper_head units are KV groups.
ID_PREFIX = {
    "layer": "layer",
    "attn": "attn",
    "mlp": "mlp",
    "head": "head",
    "kv_group": "kvgroup",
    "oproj": "oproj",
    "oproj_cumulative": "oprojcum",
    "layer_swap": "layerswap",
    "layer_swap_cumulative": "layerswapcum",
}
HEAD_KINDS = ("head", "kv_group")  # units within one layer's attention
# Units that take tensors from a source model: its o_proj weights, or whole layers.
O_PROJ_KINDS = ("oproj", "oproj_cumulative")
LAYER_SWAP_KINDS = ("layer_swap", "layer_swap_cumulative")
SOURCE_KINDS = (*O_PROJ_KINDS, *LAYER_SWAP_KINDS)
CUMULATIVE_KINDS = ("oproj_cumulative", "layer_swap_cumulative")  # layers 0..L
SUBLAYERS = ("attn", "mlp")  # sublayer kinds: the anatomy names each one's module
LAYER_SET = "layer_set"  # several layers skipped at once, one set per unit
CONFIG_KINDS = (*ID_PREFIX, "paper_head", LAYER_SET)
# Orders of a layer_set sweep: from the baseline's proxies (resolved when the unit runs), or
# known from the config alone.
PROXY_ORDERS = ("block_influence", "angular_block")
REMOVAL_ORDERS = (*PROXY_ORDERS, "random", "explicit")
QUERY_HEAD_KINDS = ("head", "paper_head")  # config kinds sweeping query heads (KV groups: kv_group)
# Config kinds with a layer-importance proxy, and the prefix of its columns in proxies.csv
# (ablate.proxy: the whole layer, or the residual stream around one sublayer).
PROXY_COLUMN_PREFIX = {"layer": "", "attn": "attn_", "mlp": "mlp_"}
_KIND_OF_PREFIX = {prefix: kind for kind, prefix in ID_PREFIX.items()}
# The id grammar of the table above, one pattern: a kind's prefix and its numbers, a layer set,
# or a proxy order's count (parse() checks that a prefix's parts are the ones its kind has).
ID_FORMS = ("base, layer{L}, attn{L}, mlp{L}, head{L}.{H}, kvgroup{L}.{G}, oproj{L}_from_{M}, "
            "oprojcum{L}_from_{M}, layerswap{L}_from_{M}, layerswapcum{L}_from_{M}, "
            "layers{A}+{B}..., drop{N}_by_{order}")  # fmt: skip
_ID = re.compile(
    r"^(?:(?P<base>base)|layers(?P<set>\d+(?:\+\d+)*)"
    r"|drop(?P<count>\d+)_by_(?P<order>" + "|".join(PROXY_ORDERS) + ")"
    r"|(?P<prefix>[a-z]+?)(?P<layer>\d+)(?:\.(?P<head>\d+))?(?:_from_(?P<source>[a-z0-9_]+))?)$"
)


@dataclass(frozen=True)
class Ablation:
    """One ablation unit; ``kind`` is base or a config kind of :data:`ID_PREFIX`."""

    kind: str
    layer: int | None = None
    head: int | None = None  # query head (head) or KV group (kv_group)
    source: str | None = None  # model id providing the tensors (source kinds)
    layers: tuple[int, ...] = ()  # layer_set: the skipped layers, ascending (once resolved)
    order: str | None = None  # layer_set by a proxy order, until resolved; ``layer``: its count

    @classmethod
    def parse(cls, ablation_id: str) -> Ablation:
        match = _ID.match(ablation_id)
        kind = _KIND_OF_PREFIX.get(match["prefix"]) if match and match["prefix"] else None
        if match is None or (match["prefix"] and not _well_formed(kind, match)):
            raise ValueError(f"ablation id {ablation_id!r} is not one of: {ID_FORMS}")
        if match["base"]:
            return cls("base")
        if match["set"]:
            layers = tuple(int(layer) for layer in match["set"].split("+"))
            if list(layers) != sorted(set(layers)):
                raise ValueError(f"ablation id {ablation_id!r}: layers not ascending and distinct")
            return cls(LAYER_SET, layers=layers)
        if match["order"]:
            return cls(LAYER_SET, layer=int(match["count"]), order=match["order"])
        head = int(match["head"]) if match["head"] is not None else None
        return cls(kind, layer=int(match["layer"]), head=head, source=match["source"])

    @property
    def id(self) -> str:
        if self.kind == "base":
            return "base"
        if self.kind == LAYER_SET:
            if self.order is not None:
                return f"drop{self.layer}_by_{self.order}"
            return "layers" + "+".join(map(str, self.layers))
        unit = f"{ID_PREFIX[self.kind]}{self.layer}"
        if self.kind in HEAD_KINDS:
            return f"{unit}.{self.head}"
        if self.kind in SOURCE_KINDS:
            return f"{unit}_from_{self.source}"
        return unit

    @property
    def replaced_layers(self) -> range:
        """Layers whose o_proj (or every tensor) the source model provides (empty for the
        kinds that take nothing from a source)."""
        if self.kind in CUMULATIVE_KINDS:
            return range(self.layer + 1)
        if self.kind in SOURCE_KINDS:
            return range(self.layer, self.layer + 1)
        return range(0)

    @property
    def position(self) -> int | None:
        """Where a figure plots the unit: its layer, or how many layers a layer_set removes."""
        return len(self.layers) or self.layer

    def first_changed_layer(self, num_layers: int) -> int:
        """The lowest layer this ablation changes (``num_layers`` for base, which changes none;
        0 for a layer_set not yet resolved): layers below it run as in the unablated model."""
        if self.kind == "base":
            return num_layers
        if self.kind == LAYER_SET:
            return self.layers[0] if self.layers else 0
        return self.replaced_layers.start if self.replaced_layers else self.layer

    def first_run_layer(self, num_layers: int) -> int:
        """The lowest layer the ablated model must run on the hidden states entering its first
        changed layer: a skipped layer's output is its input, so the layer above it."""
        skipped = self.kind == "layer" or bool(self.layers)
        return self.first_changed_layer(num_layers) + skipped

    @property
    def skipped_layers(self) -> tuple[int, ...]:
        """The layers whose output is their input (layer skips)."""
        return (self.layer,) if self.kind == "layer" else self.layers

    @property
    def sort_key(self) -> tuple:
        """Chunks hold units of one kind (and source) in layer, then head order (layer_set: by
        count, then the set)."""
        return (
            self.kind,
            self.source or self.order or "",
            self.position or 0,
            self.head or 0,
            self.layers,
        )


def axis_label(kind: str) -> str:
    """A figure's x axis for a config kind. Indices are 0-based everywhere
    (``model.model.layers[i]``); the paper's head axis is 1-based."""
    if kind == LAYER_SET:
        return "layers removed"
    unit = {"head": "query head", "paper_head": "query head", "kv_group": "KV group"}
    return f"{unit.get(kind, 'layer')} (0-based)"


def unit_name(kind: str, position: int, head: int | None, ablation_id: str) -> str:
    """A plotted unit in words, for a figure's findings (``position``: its x, a layer or the
    number of layers a layer_set removes)."""
    if kind == LAYER_SET:
        return f"{position} layers removed ({ablation_id})"
    return f"layer {position}" + ("" if head is None else f" head {head}")


def _well_formed(kind: str | None, match: re.Match) -> bool:
    has_head, has_source = match["head"] is not None, match["source"] is not None
    return (
        kind is not None
        and has_head == (kind in HEAD_KINDS)
        and has_source == (kind in SOURCE_KINDS)
    )


def sweep(spec: dict, model: dict) -> list[tuple[Ablation, int | None]]:
    """Every unit a figure's ablation spec (config ``ablation``) sweeps on ``model`` (config
    ``models.<id>``), with the head it is plotted at (None for layer kinds).

    ``paper_head`` is query head h as the paper's ``head_pruning.py`` prunes it: it zeroes h's
    q_proj rows and o_proj columns and the k_proj/v_proj rows of h's KV group, so under GQA
    every query head of that group outputs 0. Its unit is that KV group (shared by the group's
    heads); without GQA the group is h alone, the single-head unit."""
    kind = spec["kind"]
    if kind == LAYER_SET:
        return [(unit, None) for unit in removal_units(spec, model["num_layers"])]
    layers = range(model["num_layers"]) if spec.get("layers", "all") == "all" else spec["layers"]
    if kind in SOURCE_KINDS:
        return [(Ablation(kind, layer, source=spec["source"]), None) for layer in layers]
    if kind in SUBLAYERS or kind == "layer":
        return [(Ablation(kind, layer), None) for layer in layers]
    count = model["num_kv_heads"] if kind == "kv_group" else model["num_heads"]
    heads = range(count) if spec.get("heads", "all") == "all" else spec["heads"]
    if kind != "paper_head":
        return [(Ablation(kind, layer, head), head) for layer in layers for head in heads]
    per_group = model["num_heads"] // model["num_kv_heads"]
    unit = ("head", 1) if per_group == 1 else ("kv_group", per_group)
    return [(Ablation(unit[0], layer, head // unit[1]), head) for layer in layers for head in heads]


def removal_units(spec: dict, num_layers: int) -> list[Ablation]:
    """The layer_set units of a removal sweep (config ``order``, ``removed``: the counts n;
    ``seeds``: the random order's draws; ``layers``: the explicit order). A proxy order's units
    are named by order and count until :func:`resolved`; the others are their sets."""
    order, counts = spec["order"], spec["removed"]
    if order in PROXY_ORDERS:
        return [Ablation(LAYER_SET, layer=n, order=order) for n in counts]
    if order == "random":
        orders = [random.Random(seed).sample(range(num_layers), num_layers)
                  for seed in spec.get("seeds", [0])]  # fmt: skip
    else:
        orders = [spec["layers"]]
    return [Ablation(LAYER_SET, layers=tuple(sorted(o[:n]))) for o in orders for n in counts]


def resolved(
    ablation: Ablation,
    block_influence: Sequence[float],
    block_distance: Mapping[tuple[int, int], float],
) -> Ablation:
    """A layer_set unit of a proxy order as the set it names, from the unablated model's block
    influence per layer and angular distance per (first layer, block size) of its baseline
    (ablate.proxy); other units as they are. Ties go to the lower layer."""
    if ablation.order is None:
        return ablation
    count, num_layers = ablation.layer, len(block_influence)
    if ablation.order == "block_influence":  # ShortGPT: the n least influential layers
        by_influence = sorted(range(num_layers), key=lambda layer: (block_influence[layer], layer))
        return Ablation(LAYER_SET, layers=tuple(sorted(by_influence[:count])))
    # Gromov et al.: the n contiguous layers whose input and output are closest
    starts = range(num_layers - count + 1)
    first = min(starts, key=lambda start: (block_distance[(start, count)], start))
    return Ablation(LAYER_SET, layers=tuple(range(first, first + count)))


def silenced_heads(ablation: Ablation, arch: Architecture) -> range:
    """Query heads whose output a head or kv_group ablation zeroes."""
    if ablation.kind == "head":
        return range(ablation.head, ablation.head + 1)
    group = arch.heads_per_group
    return range(ablation.head * group, (ablation.head + 1) * group)


def check_in_range(ablation: Ablation, arch: Architecture) -> None:
    """Raise ValueError if ``ablation`` names a layer or head this architecture lacks (whether
    that layer has the part a kind ablates is the proof's: ablate.proof)."""
    if ablation.kind == "base":
        return
    if ablation.kind == LAYER_SET:
        if ablation.order is not None:
            raise ValueError(f"{ablation.id}: resolve the order's layers first (resolved())")
        if bad := [layer for layer in ablation.layers if not 0 <= layer < arch.num_layers]:
            raise ValueError(f"{ablation.id}: layers {bad} out of range 0..{arch.num_layers - 1}")
        return
    if not 0 <= ablation.layer < arch.num_layers:
        raise ValueError(
            f"{ablation.id}: layer {ablation.layer} out of range 0..{arch.num_layers - 1}"
        )
    if ablation.kind == "head" and not 0 <= ablation.head < arch.num_heads:
        raise ValueError(
            f"{ablation.id}: head {ablation.head} out of range 0..{arch.num_heads - 1}"
        )
    if ablation.kind == "kv_group":
        if arch.num_kv_heads == arch.num_heads:
            raise ValueError(
                f"{ablation.id}: head mode kv_group needs grouped-query attention, "
                f"but this model has {arch.num_heads} query and {arch.num_kv_heads} KV heads"
            )
        if not 0 <= ablation.head < arch.num_kv_heads:
            raise ValueError(
                f"{ablation.id}: KV group {ablation.head} out of range 0..{arch.num_kv_heads - 1}"
            )


@dataclass(frozen=True)
class WeightEdit:
    """One model tensor an ablation changes (by its state-dict key, which is the checkpoint's for
    text-only models): zeroed whole, zeroed in its input features ``columns`` (start, stop) along
    ``axis`` (1 for a Linear's (out, in) weight, 0 for GPT-2's Conv1D (in, out)), or replaced
    by the source model's tensor of the same name."""

    key: str
    columns: tuple[int, int] | None = None
    axis: int = 1
    from_source: bool = False

    @property
    def module(self) -> str:
        return self.key.rpartition(".")[0]

    def apply(self, original: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        """The edited tensor (a new one; ``original`` is left as it was)."""
        if self.from_source:
            if source is None or source.shape != original.shape:
                shape = None if source is None else tuple(source.shape)
                raise ValueError(f"{self.key}: source tensor {shape}, {tuple(original.shape)} here")
            return source.to(dtype=original.dtype, device=original.device).clone()
        if self.columns is None:
            return original.new_zeros(original.shape)
        edited = original.clone()
        edited.narrow(self.axis, self.columns[0], self.columns[1] - self.columns[0]).zero_()
        return edited


def weight_edits(ablation: Ablation, anatomy: Anatomy) -> list[WeightEdit]:
    """The exact weight-edit form of ``ablation`` (empty for the baseline): a sublayer's output
    projections (weights and biases; every expert's) zeroed, a head's input features of the
    attention output projection zeroed, or that projection's weight taken from the source."""
    check_in_range(ablation, anatomy.arch)
    if ablation.kind in ("layer", LAYER_SET, *SUBLAYERS):
        zeroed = [(layer, part) for layer in ablation.skipped_layers for part in SUBLAYERS]
        zeroed = zeroed or [(ablation.layer, ablation.kind)]
        edits = []
        for layer, part in zeroed:
            if not (keys := anatomy.out_parameters(layer, part)):
                raise ValueError(
                    f"{ablation.id}: no {part} output projection of {anatomy.model_type} is known "
                    "to ablate.anatomy (use backend: hf, whose hooks need none)"
                )
            edits += [WeightEdit(key) for key in keys]
        return edits
    if ablation.kind in HEAD_KINDS:
        heads, width = silenced_heads(ablation, anatomy.arch), anatomy.head_widths[ablation.layer]
        return [
            WeightEdit(
                anatomy.attention_out_weight(ablation.layer),
                columns=(heads.start * width, heads.stop * width),
                axis=0 if anatomy.conv1d_out else 1,
            )
        ]
    return [
        WeightEdit(key, from_source=True)
        for layer in ablation.replaced_layers
        for key in (
            anatomy.block_parameters(layer)
            if ablation.kind in LAYER_SWAP_KINDS
            else [anatomy.attention_out_weight(layer)]
        )
    ]


def check_weight_edits_exact(
    ablation: Ablation, anatomy: Anatomy, tensor_keys: Iterable[str]
) -> list[WeightEdit]:
    """``ablation``'s weight edits, or ValueError (one line) where they are not exact or name
    tensors that ``tensor_keys`` (a model's state dict or a checkpoint's tensor names) lacks."""
    edits = weight_edits(ablation, anatomy)
    if anatomy.post_norm_residual and ablation.kind in ("layer", LAYER_SET, *SUBLAYERS):
        raise ValueError(
            f"{ablation.id}: {anatomy.model_type} normalizes the residual stream after each "
            "sublayer's add, so zeroed projections are not a removed sublayer (use backend: hf)"
        )
    keys = set(tensor_keys)
    if missing := [edit.key for edit in edits if edit.key not in keys]:
        raise ValueError(
            f"{ablation.id}: no tensor {missing[0]} in the checkpoint ({anatomy.model_type} "
            "stores it under another name, e.g. fused or per-expert; use backend: hf)"
        )
    return edits


def checkpoint_keys(checkpoint_dir: Path) -> set[str]:
    """Every tensor name of a safetensors checkpoint, read from the headers only."""
    from safetensors import safe_open

    keys: set[str] = set()
    for shard in sorted(Path(checkpoint_dir).glob("*.safetensors")):
        with safe_open(shard, framework="pt") as handle:
            keys |= set(handle.keys())
    return keys


@contextlib.contextmanager
def weight_edited(
    model: nn.Module, ablation: Ablation, source: Mapping[str, torch.Tensor] | None = None
) -> Iterator[None]:
    """Apply ``ablation`` as weight edits for the duration of the block; the original tensors
    are put back on exit (bit-identical). ``source``: state-dict key -> tensor, for o_proj kinds."""
    parameters = dict(model.named_parameters())
    edits = check_weight_edits_exact(ablation, Anatomy.of(model), parameters)
    originals: list[tuple[nn.Parameter, torch.Tensor]] = []
    try:
        for edit in edits:
            parameter = parameters[edit.key]
            originals.append((parameter, parameter.data))
            parameter.data = edit.apply(parameter.data, (source or {}).get(edit.key))
        yield
    finally:
        for parameter, original in originals:
            parameter.data = original


def load_tensors(checkpoint_dir: Path, keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """Read only the named tensors from a safetensors checkpoint (no full model)."""
    from safetensors import safe_open

    wanted, found = set(keys), {}
    for shard in sorted(Path(checkpoint_dir).glob("*.safetensors")):
        with safe_open(shard, framework="pt") as handle:
            for key in wanted & set(handle.keys()):
                found[key] = handle.get_tensor(key)
    if missing := sorted(wanted - found.keys()):
        raise ValueError(f"{checkpoint_dir}: no tensor {', '.join(missing)}")
    return found


def load_source_tensors(
    checkpoint_dir: Path, anatomy: Anatomy, ablations: Iterable[Ablation]
) -> dict[str, torch.Tensor]:
    """The source model's tensors the ``ablations`` take (by state-dict key), read from its
    safetensors checkpoint: o_proj weights, or every tensor of a swapped layer."""
    keys = {e.key for a in ablations for e in weight_edits(a, anatomy) if e.from_source}
    return load_tensors(checkpoint_dir, keys)


def _skip_layer(module, args, kwargs, output):
    # The block's output becomes its input: identical to deleting the block.
    hidden = args[0] if args else kwargs["hidden_states"]
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def _zero_output(module, args, output):
    # The sublayer's contribution to the residual stream is its (first) output: make it 0.
    if isinstance(output, tuple):
        return (output[0].new_zeros(output[0].shape), *output[1:])
    return output.new_zeros(output.shape)


def _zero_heads_hook(heads: range, head_width: int):
    start, stop = heads.start * head_width, heads.stop * head_width

    def hook(module, args):
        hidden = args[0].clone()
        hidden[..., start:stop] = 0
        return (hidden, *args[1:])

    return hook


@contextlib.contextmanager
def ablated(
    model: nn.Module,
    ablation: Ablation,
    source: Mapping[str, torch.Tensor] | None = None,
    anatomy: Anatomy | None = None,
) -> Iterator[None]:
    """Apply ``ablation`` to ``model`` for the duration of the block; always undone on exit.
    ``source``: state-dict key -> the source model's tensor, for the source kinds (what
    :func:`load_source_tensors` reads); ``anatomy``: the model's, where the caller has it."""
    anatomy = anatomy or Anatomy.of(model)
    check_in_range(ablation, anatomy.arch)
    blocks = anatomy.blocks(model)
    handles = []
    swapped: list[tuple[nn.Parameter, torch.Tensor]] = []
    try:
        for layer in ablation.skipped_layers:
            handles.append(blocks[layer].register_forward_hook(_skip_layer, with_kwargs=True))
        if ablation.kind in SUBLAYERS:
            name = anatomy.attention if ablation.kind == "attn" else anatomy.mlp
            sublayer = blocks[ablation.layer].get_submodule(name)
            handles.append(sublayer.register_forward_hook(_zero_output))
        elif ablation.kind in HEAD_KINDS:
            out = blocks[ablation.layer].get_submodule(anatomy.attention_out)
            width = anatomy.head_widths[ablation.layer]
            hook = _zero_heads_hook(silenced_heads(ablation, anatomy.arch), width)
            handles.append(out.register_forward_pre_hook(hook))
        elif ablation.kind in SOURCE_KINDS:
            for edit in weight_edits(ablation, anatomy):
                if source is None or edit.key not in source:
                    raise ValueError(f"{ablation.id} needs {edit.key} of {ablation.source}")
                parameter = model.get_parameter(edit.key)
                replacement = source[edit.key]
                if replacement.shape != parameter.shape:
                    raise ValueError(
                        f"{ablation.id}: {edit.key} has shape {tuple(replacement.shape)} in "
                        f"{ablation.source}, {tuple(parameter.shape)} here"
                    )
                swapped.append((parameter, parameter.data))
                parameter.data = replacement.to(dtype=parameter.dtype, device=parameter.device)
        yield
    finally:
        for handle in handles:
            handle.remove()
        for parameter, original in swapped:
            parameter.data = original
