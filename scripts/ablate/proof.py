"""Each ablation kind's defining invariants, checked on the architecture actually loaded.

No family list decides whether an ablation is exact: the invariants that define each kind are
checked numerically, on a probe batch, in every form the workflow uses (hooks and the
shared-prefix sweep on the HF backend, weight edits on vLLM):

- ``layer``, ``layer_set``: each removed block maps its input to itself;
- ``attn``, ``mlp``: with both sublayers of a block removed the block maps its input to itself,
  and the hook form gives the weight-edit form's logits;
- ``head``, ``kv_group`` (and ``paper_head``, their config name): each layer's heads are disjoint
  column slices covering the attention output projection's input exactly (its own head width
  per layer); all heads of a layer removed equal that projection outputting its bias alone; a KV
  group's heads removed equal that KV head's value rows zeroed;
- ``oproj*``, ``layer_swap*``: the edited tensors equal the source's (every tensor of a swapped
  block), the source checkpoint stores them under the model's names, and the hook form gives
  the weight-edit form's logits;
- the sweep: its log-likelihoods equal one plain forward per unit under the hook form.

Before any job, :func:`prove_config` proves every kind on a tiny random-weight twin built from
the model's own ``config.json`` (ablate.twin); at job start, :func:`check_units` checks the
chunk's own units on the loaded model, whose weights can differ from the twin's. A failing
invariant refuses that kind (or that form) for that model in one line naming the model type,
the kind and the invariant; a failing sweep invariant only turns the sweep off.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ablate.ablations import (
    HEAD_KINDS,
    LAYER_SET,
    O_PROJ_KINDS,
    SOURCE_KINDS,
    SUBLAYERS,
    Ablation,
    ablated,
    check_weight_edits_exact,
    checkpoint_keys,
    weight_edited,
    weight_edits,
)
from ablate.anatomy import Anatomy, UnsupportedModel

FORMS = ("hook", "weight_edit")  # the HF backend's hooks; vLLM's (and exact) weight edits
# Kinds a unit id can have (the config's paper_head is head or kv_group: ablations.sweep).
UNIT_KINDS = ("layer", LAYER_SET, *SUBLAYERS, *HEAD_KINDS, *SOURCE_KINDS)
ATTENTION_KINDS = ("attn", *HEAD_KINDS, *O_PROJ_KINDS)  # units of an attention sublayer
PROBE_SHAPE = (2, 10)  # sequences x tokens of the probe batch
SOURCE_NAME = "twin"  # the source model's name in the twin's unit ids


class Refused(ValueError):
    """An ablation kind whose defining invariant fails on a model; the message is one line."""


@dataclass
class Proof:
    """What the invariants showed for one model: per kind, the forms refused and why, and why
    the sweep is not exact for it (kinds absent: proven)."""

    model_type: str
    refused: dict[str, dict[str, str]] = field(default_factory=dict)  # kind -> form -> why
    sweep_off: dict[str, str] = field(default_factory=dict)  # kind -> why

    def refuse(self, kind: str, forms: Sequence[str], why: str) -> None:
        for form in forms:
            self.refused.setdefault(kind, {}).setdefault(form, why)

    def check(self, kind: str, form: str) -> None:
        """Raise :class:`Refused` (one line) if ``kind`` is not proven in ``form``."""
        if why := self.refused.get(kind, {}).get(form):
            raise Refused(f"{self.model_type}: {kind} ({form.replace('_', ' ')} form): {why}")

    def as_record(self) -> dict:
        return {"model_type": self.model_type, "refused": self.refused, "sweep_off": self.sweep_off}


def tolerance(model) -> tuple[float, float]:
    """How far two forms of one ablation may differ: in a logit (per unit of the logits'
    scale), and in a log-likelihood per continuation token (as make gpu-check measures the
    sweep); the rounding of the model's dtype, far below any ablation's effect."""
    exact = next(model.parameters()).dtype == torch.float32
    return (1e-4, 1e-3) if exact else (2e-2, 0.1)


def probe(model, anatomy: Anatomy) -> torch.Tensor:
    """A fixed batch of short token sequences within the model's vocabulary."""
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, max(4, min(vocab, 500)), PROBE_SHAPE, generator=generator)
    return ids.to(model.get_input_embeddings().weight.device)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def _differ(a: torch.Tensor, b: torch.Tensor, tol: float) -> float | None:
    """The largest difference of two logit tensors, if beyond ``tol`` of their scale."""
    worst = float((a - b).abs().max())
    return worst if worst > tol * max(1.0, float(b.abs().max())) else None


@contextlib.contextmanager
def applied(model, form: str, units: Sequence[Ablation], anatomy: Anatomy, source) -> Iterator:
    """``units`` applied together in ``form``."""
    with contextlib.ExitStack() as stack:
        for unit in units:
            if form == "hook":
                stack.enter_context(ablated(model, unit, source, anatomy))
            else:
                stack.enter_context(weight_edited(model, unit, source))
        yield


def _identity_gap(model, anatomy: Anatomy, layers: Sequence[int], context, ids) -> float:
    """The largest |output - input| of the blocks ``layers`` in a forward of ``ids`` under
    ``context`` (entered first, so these hooks see what its hooks return)."""
    import inspect

    gaps: list[float] = []
    with context, contextlib.ExitStack() as handles:
        for layer in layers:
            block = anatomy.blocks(model)[layer]
            first = next(iter(inspect.signature(block.forward).parameters))
            seen: dict[str, torch.Tensor] = {}

            def before(module, args, kwargs, seen=seen, first=first):
                seen["in"] = args[0] if args else kwargs.get(first, kwargs.get("hidden_states"))

            def after(module, args, kwargs, output, seen=seen):
                out = output[0] if isinstance(output, tuple) else output
                gaps.append(float((out.float() - seen["in"].float()).abs().max()))

            handles.callback(block.register_forward_pre_hook(before, with_kwargs=True).remove)
            handles.callback(block.register_forward_hook(after, with_kwargs=True).remove)
        _logits(model, ids)
    return max(gaps, default=float("inf"))


@dataclass
class Prover:
    """The invariants of one model (``source``: state-dict key -> a source model's tensor, for
    the source kinds; ``stored``: the tensor names its checkpoints store)."""

    model: torch.nn.Module
    anatomy: Anatomy
    source: Mapping[str, torch.Tensor] | None
    stored: set[str] | None
    proof: Proof
    forms: Sequence[str] = FORMS

    def __post_init__(self) -> None:
        self.ids = probe(self.model, self.anatomy)
        self.tol, self.token_tol = tolerance(self.model)

    def applied(self, form: str, units: Sequence[Ablation]):
        return applied(self.model, form, units, self.anatomy, self.source)

    def logits(self, form: str | None = None, units: Sequence[Ablation] = ()) -> torch.Tensor:
        if form is None:
            return _logits(self.model, self.ids)
        with self.applied(form, units):
            return _logits(self.model, self.ids)

    def _edit_form_reason(self, unit: Ablation) -> str | None:
        """Why ``unit`` has no exact weight-edit form here (None: it has one)."""
        try:
            check_weight_edits_exact(unit, self.anatomy, dict(self.model.named_parameters()))
        except ValueError as error:
            return str(error).partition(": ")[2]
        return None

    def _try(self, kind: str, form: str, check: Callable[[], str | None]) -> None:
        """Run one invariant; a failure (or a crash) refuses ``kind`` in ``form``."""
        try:
            why = check()
        except Exception as error:  # an ablation the model's modules do not take
            why = f"the {form.replace('_', ' ')} form fails on it ({type(error).__name__}: " + (
                " ".join(str(error).split())[:160] + ")"
            )
        if why:
            self.proof.refuse(kind, [form], why)

    def _forms(self, kind: str, unit: Ablation) -> list[str]:
        """The forms to check: those asked, but a weight-edit form that does not exist is
        refused here with its reason."""
        forms = list(self.forms)
        if "weight_edit" in forms and (why := self._edit_form_reason(unit)):
            self.proof.refuse(kind, ["weight_edit"], why)
            forms.remove("weight_edit")
        return forms

    def _forms_agree(self, kind: str, unit: Ablation, forms: Sequence[str]) -> None:
        """Where both forms hold their own invariants, they must give the same logits."""
        if set(FORMS) <= set(forms) and not self.proof.refused.get(kind):
            hook, edit = (self.logits(form, [unit]) for form in FORMS)
            if (worst := _differ(hook, edit, self.tol)) is not None:
                why = f"invariant 'hook form == weight-edit form' fails at {unit.id}"
                self.proof.refuse(kind, FORMS, f"{why} (max |Δ logit| {worst:.3g})")

    # ----------------------------------------------------------------------- the invariants

    def _identity(self, kind: str, form: str, blocks, units, invariant: str, where: str) -> None:
        """Under ``units`` in ``form``, the blocks ``blocks`` map their input to itself."""

        def check() -> str | None:
            applied_units = self.applied(form, units)
            gap = _identity_gap(self.model, self.anatomy, blocks, applied_units, self.ids)
            if gap > self.tol:
                return f"invariant '{invariant}' fails at {where} (max |out - in| {gap:.3g})"
            return None

        self._try(kind, form, check)

    def layer_skips(self, kind: str, units: Sequence[Ablation]) -> None:
        for unit in units:
            for form in self._forms(kind, unit):
                invariant = "a removed block maps its input to itself"
                self._identity(kind, form, unit.skipped_layers, [unit], invariant, unit.id)

    def sublayers(self, kind: str, layers: Sequence[int]) -> None:
        for layer in layers:
            unit = Ablation(kind, layer)
            pair = [Ablation(part, layer) for part in SUBLAYERS]
            forms = self._forms(kind, unit)
            for form in forms:
                invariant = "attn and mlp removed == the block removed"
                self._identity(kind, form, [layer], pair, invariant, f"layer {layer}")
            self._forms_agree(kind, unit, forms)

    def heads(self, kind: str, layers: Sequence[int]) -> None:
        arch = self.anatomy.arch
        if kind == "kv_group" and arch.num_kv_heads == arch.num_heads:
            self.proof.refuse(
                kind, self.forms, "needs grouped-query attention (as many KV heads as query heads)"
            )
            return
        widths = self.anatomy.head_widths
        if uncovered := [i for i in self.anatomy.attention_layers if widths[i] is None]:
            self.proof.refuse(
                kind,
                self.forms,
                f"invariant 'the heads' column slices cover "
                f"o_proj's input exactly' fails at layer {uncovered[0]}",
            )
            return
        for layer in layers:
            count = arch.num_kv_heads if kind == "kv_group" else arch.num_heads
            every = [Ablation(kind, layer, head) for head in range(count)]
            expected = self._attention_bias_only(layer)
            for form in self._forms(kind, every[0]):

                def check(form=form, every=every, layer=layer, expected=expected) -> str | None:
                    worst = _differ(self.logits(form, every), expected, self.tol)
                    if worst is not None:
                        return (
                            f"invariant 'all heads removed == o_proj outputs its bias' fails "
                            f"at layer {layer} (max |Δ logit| {worst:.3g})"
                        )
                    if kind == "kv_group":
                        return self._value_rows(form, every[-1])
                    return None

                self._try(kind, form, check)

    def _attention_bias_only(self, layer: int) -> torch.Tensor:
        """Logits with layer ``layer``'s attention output projection giving its bias alone."""
        out = self.anatomy.blocks(self.model)[layer].get_submodule(self.anatomy.attention_out)

        def bias_only(module, args, output):
            bias = getattr(module, "bias", None)
            zeros = output.new_zeros(output.shape)
            return zeros if bias is None else zeros + bias.to(output.dtype)

        handle = out.register_forward_hook(bias_only)
        try:
            return self.logits()
        finally:
            handle.remove()

    def _value_rows(self, form: str, unit: Ablation) -> str | None:
        """A KV group's heads removed == that KV head's value rows zeroed (by hand here), for
        one of the value-row layouts of :func:`value_rows`."""
        got = self.logits(form, [unit])
        worst = None
        for rows in value_rows(self.model, self.anatomy, unit.layer, unit.head):
            originals = [(parameter, parameter.data) for parameter, _ in rows]
            for parameter, index in rows:
                parameter.data = parameter.data.clone()
                parameter.data[index] = 0
            try:
                expected = self.logits()
            finally:
                for parameter, original in originals:
                    parameter.data = original
            if (worst := _differ(got, expected, self.tol)) is None:
                return None
        if worst is None:
            return (
                "invariant 'a KV group's heads removed == its value rows zeroed' cannot be "
                "checked: no value projection of a known layout"
            )
        return (
            f"invariant 'a KV group's heads removed == its value rows zeroed' fails at "
            f"{unit.id} (max |Δ logit| {worst:.3g})"
        )

    def swaps(self, kind: str, layers: Sequence[int]) -> None:
        for layer in layers:
            unit = Ablation(kind, layer, source=SOURCE_NAME)
            keys = [edit.key for edit in weight_edits(unit, self.anatomy)]
            readable = self.source if self.stored is None else self.stored & set(self.source or {})
            if self.source is None or (missing := [k for k in keys if k not in readable]):
                name = "no source" if self.source is None else missing[0]
                self.proof.refuse(
                    kind,
                    self.forms,
                    f"the source checkpoint does not store "
                    f"{name} under the model's name (e.g. experts fused on load)",
                )
                return
            forms = self._forms(kind, unit)
            for form in forms:

                def check(form=form, unit=unit, keys=keys) -> str | None:
                    with applied(self.model, form, [unit], self.anatomy, self.source):
                        unequal = [
                            k
                            for k in keys
                            if not torch.equal(
                                self.model.get_parameter(k),
                                self.source[k].to(self.model.get_parameter(k)),
                            )
                        ]
                    if unequal:
                        return (
                            f"invariant 'the edited tensors equal the source's' fails at "
                            f"{unequal[0]}"
                        )
                    return None

                self._try(kind, form, check)
            self._forms_agree(kind, unit, forms)

    def sweep(self, units: Sequence[Ablation]) -> None:
        """The sweep's log-likelihoods == one plain forward per unit under its hooks; a kind
        whose unit differs (or any, if the sweep cannot run) has the sweep off."""
        from ablate.sweep import sweep_loglikelihoods

        units = [
            u
            for u in units
            if u.kind not in self.proof.refused or "hook" not in self.proof.refused[u.kind]
        ]
        ids = self.ids.tolist()
        # Two options per context, all as long, so a unit's plain forward is one batch.
        requests = [(tuple(row[:6]), tuple(option)) for row in ids
                    for option in (row[6:], row[6:][::-1])]  # fmt: skip
        try:
            swept = sweep_loglikelihoods(self.model, requests, units, self.source, 4, 64)
        except Exception as error:  # any failure: HFLM scores instead
            why = f"the sweep fails on it ({type(error).__name__}: {' '.join(str(error).split())[:120]})"
            for unit in units:
                self.proof.sweep_off.setdefault(unit.kind, why)
            return
        for unit in units:
            plain = plain_loglikelihoods(self.model, requests, unit, self.anatomy, self.source)
            for (ll, _), expected, (_, continuation) in zip(
                swept[unit.id], plain, requests, strict=True
            ):
                if abs(ll - expected) > self.token_tol * len(continuation):
                    self.proof.sweep_off.setdefault(
                        unit.kind,
                        f"invariant 'the sweep == a plain forward per unit' fails at {unit.id} "
                        f"(|Δ log-likelihood| {abs(ll - expected):.3g})",
                    )
                    break


def plain_loglikelihoods(model, requests, unit: Ablation, anatomy: Anatomy, source) -> list[float]:
    """Each request scored as its own sequence under ``unit``'s hooks, as lm-eval scores it
    (requests of one length: one batch, no padding)."""
    import torch.nn.functional as F

    device = model.get_input_embeddings().weight.device
    tokens = torch.tensor([context + continuation for context, continuation in requests])
    with ablated(model, unit, source, anatomy), torch.no_grad():
        logits = model(input_ids=tokens.to(device), use_cache=False).logits[:, :-1].float()
    log_probs = F.log_softmax(logits, dim=-1).cpu()
    scores = []
    for row, (context, _) in enumerate(requests):
        targets = tokens[row, len(context) :]
        scores.append(float(log_probs[row, len(context) - 1 :].gather(1, targets[:, None]).sum()))
    return scores


FUSED_QKV_NAMES = ("qkv_proj", "query_key_value", "c_attn", "Wqkv")


def value_rows(model, anatomy: Anatomy, layer: int, group: int) -> list[list]:
    """Candidate layouts of KV head ``group``'s value rows in layer ``layer``, each a list of
    (parameter, row index) over the projection's weight and bias: a separate value projection
    (v_proj), or one fused q/k/v projection laid out concatenated (all query rows, key rows,
    value rows) or grouped (per KV head: its query heads, key, value). Only a layout that gives
    the kv_group unit's logits proves it (Prover._value_rows)."""
    attention = anatomy.blocks(model)[layer].get_submodule(anatomy.attention)
    arch, width = anatomy.arch, anatomy.head_widths[layer]
    per_group = arch.heads_per_group
    layouts = []
    if isinstance(separate := getattr(attention, "v_proj", None), torch.nn.Linear):
        layouts.append((separate, group * width))
    fused = next((getattr(attention, n) for n in FUSED_QKV_NAMES if hasattr(attention, n)), None)
    if (
        isinstance(fused, torch.nn.Linear)
        and fused.out_features == (arch.num_heads + 2 * arch.num_kv_heads) * width
    ):
        layouts.append((fused, (arch.num_heads + arch.num_kv_heads + group) * width))
        layouts.append((fused, (group * (per_group + 2) + per_group + 1) * width))
    return [
        [
            (p, slice(start, start + width))
            for p in (projection.weight, projection.bias)
            if p is not None
        ]
        for projection, start in layouts
    ]


def representative_layers(model, anatomy: Anatomy, layers: Sequence[int]) -> list[int]:
    """The first of ``layers`` of each distinct block structure (module classes and attention
    type): the invariants of one such layer are those of its like."""
    from ablate.twin import block_structure

    structure = block_structure(model, anatomy.blocks(model))
    firsts: dict = {}
    for layer in layers:
        firsts.setdefault(structure[layer], layer)
    return sorted(firsts.values())


def prove(
    model,
    kinds: Sequence[str],
    source: Mapping[str, torch.Tensor] | None = None,
    stored: set[str] | None = None,
    layers: Mapping[str, Sequence[int]] | None = None,
    forms: Sequence[str] = FORMS,
    sweep_units: Sequence[Ablation] | None = None,
) -> Proof:
    """Check the invariants of every unit kind of ``kinds`` on ``model`` at ``layers[kind]``
    (default: the first layer of each block structure), and the sweep on ``sweep_units``
    (default: one unit of each kind)."""
    anatomy = Anatomy.of(model)
    proof = Proof(anatomy.model_type)
    prover = Prover(model, anatomy, source, stored, proof, forms)
    every = range(anatomy.arch.num_layers)
    without = sorted(set(every) - set(anatomy.attention_layers))
    swept: list[Ablation] = [Ablation("base")]
    for kind in kinds:
        reps = (
            representative_layers(model, anatomy, every) if layers is None else sorted(layers[kind])
        )
        attention_reps = [layer for layer in reps if layer in anatomy.attention_layers]
        if kind in ATTENTION_KINDS and without:
            proof.refuse(
                kind,
                forms,
                f"layers {', '.join(map(str, without[:4]))}"
                f"{'...' if len(without) > 4 else ''} have no attention sublayer "
                "(a hybrid): allowed here layer, layer_set, mlp",
            )
            continue
        if kind in ("layer", LAYER_SET):
            # A layer set removes its blocks together: all of them at once, and the last layer
            # with them on the twin (a set that reaches the top).
            together = tuple(sorted(set(reps) | ({every[-1]} if layers is None else set())))
            units = (
                [Ablation("layer", layer) for layer in reps]
                if kind == "layer"
                else [Ablation(LAYER_SET, layers=together)]
            )
            prover.layer_skips(kind, units)
            swept.append(units[0])
        elif kind in SUBLAYERS:
            prover.sublayers(kind, attention_reps if kind == "attn" else reps)
            swept.append(Ablation(kind, reps[0] if kind == "mlp" else attention_reps[0]))
        elif kind in HEAD_KINDS:
            prover.heads(kind, attention_reps)
            swept.append(Ablation(kind, attention_reps[0], 0))
        elif kind in SOURCE_KINDS:
            prover.swaps(kind, attention_reps if kind in ATTENTION_KINDS else reps)
            swept.append(Ablation(kind, reps[0], source=SOURCE_NAME))
    if anatomy.sweep_blocker:
        proof.sweep_off = {kind: anatomy.sweep_blocker for kind in kinds}
    else:
        prover.sweep(sweep_units or [u for u in swept if u.kind == "base" or u.kind in kinds])
    return proof


def twins(config, attn_implementation: str = "sdpa"):
    """(twin, source twin, the tensor names a checkpoint of the source stores) of the model
    ``config`` describes; the source is saved and its names read back, so they are the real
    format's. Raises UnsupportedModel (one line) where no twin can be built."""
    from ablate.anatomy import Architecture
    from ablate.twin import build_twin

    def blocks_of(model):
        return Anatomy.of(model).blocks(model)

    Architecture.from_config(config)  # an encoder, or a config without attention: one line
    try:
        model = build_twin(config, blocks_of, 0, attn_implementation)
        source = build_twin(config, blocks_of, 1, attn_implementation)
        folder = tempfile.TemporaryDirectory()
        with folder:
            source.save_pretrained(folder.name)
            stored = checkpoint_keys(Path(folder.name))
    except UnsupportedModel:
        raise
    except Exception as error:  # any failure to build is a refusal
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        raise UnsupportedModel(
            f"{text.model_type}: no tiny twin can be built from its config to prove the "
            f"ablations on ({type(error).__name__}: {' '.join(str(error).split())[:160]})"
        ) from None
    return model, source, stored


def prove_config(
    config, kinds: Sequence[str] = UNIT_KINDS, attn_implementation: str = "sdpa"
) -> Proof:
    """Every kind of ``kinds`` proven on a tiny twin of the model ``config`` describes, a second
    twin its source for the source kinds."""
    model, source, stored = twins(config, attn_implementation)
    return prove(model, kinds, dict(source.named_parameters()), stored)


def check_units(
    model, units: Sequence[Ablation], source: Mapping[str, torch.Tensor] | None
) -> str | None:
    """At job start: the invariants of the chunk's units on the loaded model (hook form),
    before anything is scored, at the first of the chunk's layers of each block structure per
    kind (the invariants are the structure's; the twin proved them on every structure), and
    the sweep on those units. Raises :class:`Refused` for a failing kind; returns why the sweep
    is not exact for these units (None: it is)."""
    anatomy = Anatomy.of(model)
    layers: dict[str, set[int]] = {}
    for unit in units:
        if unit.kind != "base":
            layers.setdefault(unit.kind, set()).update(unit.skipped_layers or [unit.layer])
    checked = {
        kind: representative_layers(model, anatomy, sorted(of_kind))
        for kind, of_kind in layers.items()
    }
    firsts: dict[str, Ablation] = {}
    for unit in units:  # the sweep on one unit per kind, at a checked layer
        if unit.kind != "base" and set(unit.skipped_layers or [unit.layer]) & set(
            checked[unit.kind]
        ):
            firsts.setdefault(unit.kind, unit)
    kinds = sorted(layers)
    sweep_units = [Ablation("base"), *firsts.values()]
    proof = prove(model, kinds, source, None, checked, ("hook",), sweep_units)
    for kind in kinds:
        proof.check(kind, "hook")
    return next(iter(proof.sweep_off.values()), None)
