"""Log-likelihoods of one request list under many ablations, sharing the unablated prefix.

An ablation whose first changed layer is l leaves the hidden states entering layer l exactly as
in the unablated model. So each batch runs the unablated model upward once, and at each
ablation's first layer branches off: that ablation is applied (the same hooks and weight swaps as
:func:`ablate.ablations.ablated`) and only layers l.. are run. A layer sweep then costs about half
the layer-forwards of one evaluation per layer, and a head sweep at the last layer about one
layer per head. Only continuation positions go through the final norm and the LM head.

Scores follow lm-eval's ``HFLM._loglikelihood_tokens`` for causal models: the same left
truncation to ``max_length``, right padding, and (log-probability sum, is-greedy) per request;
requests with the same input tokens share one row (lm-eval's one-token-continuation reuse).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ablate.ablations import Ablation, ablated, decoder_layers

Request = tuple[tuple[int, ...], tuple[int, ...]]  # (context tokens, continuation tokens)
Answer = tuple[float, bool]  # (sum of continuation log-probabilities, continuation is greedy)


class _Captured(Exception):
    """Raised by a pre-hook to stop a forward pass once the first layer's inputs are known."""


def first_layer_inputs(model, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """Hidden states and keyword arguments (mask, rotary embeddings, ...) the model passes to its
    first decoder layer; the model's own forward builds them, then is stopped."""
    captured: dict[str, Any] = {}

    def capture(module, args, kwargs):
        kwargs = dict(kwargs)
        captured["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        captured["kwargs"] = kwargs
        raise _Captured

    handle = decoder_layers(model)[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        model(input_ids=input_ids, use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    return captured["hidden"], captured["kwargs"]


def check_supported(model) -> None:
    """Refuse models whose layers do not all take the same mask (sliding-window mixes)."""
    layer_types = set(getattr(model.config.get_text_config(), "layer_types", None) or ())
    if len(layer_types) > 1:
        raise ValueError(
            f"prefix reuse needs one attention type for all layers, this model mixes "
            f"{sorted(layer_types)}; set evaluation.prefix_reuse: false"
        )


def run_layers(layers, hidden: torch.Tensor, start: int, stop: int, kwargs: dict) -> torch.Tensor:
    for layer in layers[start:stop]:
        hidden = layer(hidden, **kwargs)
    return hidden


def continuation_answers(
    model, hidden: torch.Tensor, rows: list[tuple[int, int, tuple[int, ...]]], softmax_dtype
) -> list[Answer]:
    """Score (row, input length, continuation) triples from the last layer's hidden states."""
    spans = [hidden[row, length - len(cont) : length] for row, length, cont in rows]
    logits = model.get_output_embeddings()(model.get_decoder().norm(torch.cat(spans)))
    log_probs = F.log_softmax(logits, dim=-1, dtype=softmax_dtype)
    answers, offset = [], 0
    for _, _, cont in rows:
        piece = log_probs[offset : offset + len(cont)]
        offset += len(cont)
        target = torch.tensor(cont, device=piece.device)
        greedy = bool((piece.argmax(dim=-1) == target).all())
        answers.append((float(piece.gather(1, target[:, None]).sum()), greedy))
    return answers


@torch.no_grad()
def sweep_loglikelihoods(
    model,
    requests: Sequence[Request],
    ablations: Sequence[Ablation],
    source_o_proj: Mapping[int, torch.Tensor] | None,
    batch_size: int,
    max_length: int,
    softmax_dtype: torch.dtype | None = None,
) -> dict[str, list[Answer]]:
    """Answers per ablation id for every request, in request order."""
    check_supported(model)
    layers = decoder_layers(model)
    inputs = [(ctx + cont)[-(max_length + 1) :][:-1] for ctx, cont in requests]
    requests_of: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for index, tokens in enumerate(inputs):
        requests_of[tokens].append(index)
    unique = sorted(requests_of, key=lambda tokens: (-len(tokens), tokens))
    # Branch in order of first changed layer; base (no changed layer) branches off at the top.
    branches = sorted((a.first_changed_layer(len(layers)), a.id, a) for a in ablations)
    answers: dict[str, list[Answer | None]] = {a.id: [None] * len(requests) for a in ablations}
    device = model.get_input_embeddings().weight.device
    for start in range(0, len(unique), batch_size):
        batch = unique[start : start + batch_size]
        input_ids = torch.zeros(len(batch), len(batch[0]), dtype=torch.long)
        for row, tokens in enumerate(batch):
            input_ids[row, : len(tokens)] = torch.tensor(tokens)
        rows, owners = [], []
        for row, tokens in enumerate(batch):
            for index in requests_of[tokens]:
                rows.append((row, len(tokens), requests[index][1]))
                owners.append(index)
        hidden, kwargs = first_layer_inputs(model, input_ids.to(device))
        reached = 0
        for first, _, ablation in branches:
            hidden = run_layers(layers, hidden, reached, first, kwargs)
            reached = first
            with ablated(model, ablation, source_o_proj):
                top = run_layers(layers, hidden, first, len(layers), kwargs)
            scored = continuation_answers(model, top, rows, softmax_dtype)
            for index, answer in zip(owners, scored, strict=True):
                answers[ablation.id][index] = answer
    return answers  # type: ignore[return-value]


@dataclass
class PrefixSweep:
    """lm-eval log-likelihood answers for the ablation being evaluated; whatever it computes, it
    computes for every later ablation of the job too, in one shared-prefix pass. Keyed by the
    request's (context, continuation) strings, so later units skip tokenization as well."""

    model: Any
    ablations: list[Ablation]
    source_o_proj: Mapping[int, torch.Tensor] | None
    batch_size: int
    max_length: int
    softmax_dtype: torch.dtype | None = None
    current: Ablation | None = None
    _answers: dict[str, dict[tuple[str, str], Answer]] = field(default_factory=dict)

    def _known(self) -> dict[tuple[str, str], Answer]:
        assert self.current is not None, "set PrefixSweep.current before evaluating"
        return self._answers.setdefault(self.current.id, {})

    def missing(self, requests: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
        known = self._known()
        return {request for request in requests if request not in known}

    def compute(self, requests: Sequence[tuple[tuple[str, str], list[int], list[int]]]) -> None:
        """Answer lm-eval's tokenized requests for the current and every later ablation."""
        pending = self.ablations[self.ablations.index(self.current) :]
        tokens = [(tuple(context), tuple(continuation)) for _, context, continuation in requests]
        computed = sweep_loglikelihoods(
            self.model, tokens, pending, self.source_o_proj, self.batch_size, self.max_length,
            self.softmax_dtype,
        )  # fmt: skip
        keys = [request for request, _, _ in requests]
        for ablation in pending:
            new = zip(keys, computed[ablation.id], strict=True)
            self._answers.setdefault(ablation.id, {}).update(new)

    def answers(self, requests: Sequence[tuple[str, str]]) -> list[Answer]:
        known = self._known()
        return [known[request] for request in requests]

    def finish(self, ablation: Ablation) -> None:
        """Drop an evaluated ablation's answers."""
        self._answers.pop(ablation.id, None)
