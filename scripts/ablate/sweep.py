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

Progress is durable per batch (:class:`ProgressFile`): a killed sweep's resubmission restores
the finished batches and runs only the rest, in the same batches, so its answers are bit-identical.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
import torch.nn.functional as F

from ablate.ablations import Ablation, ablated, decoder_layers

Request = tuple[tuple[int, ...], tuple[int, ...]]  # (context tokens, continuation tokens)
Answer = tuple[float, bool]  # (sum of continuation log-probabilities, continuation is greedy)
FSYNC_INTERVAL_S = 10.0  # progress records reach the disk at least this often
log = logging.getLogger(__name__)


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
    answers: dict[str, list[Answer | None]] = {a.id: [None] * len(requests) for a in ablations}
    for batch in plan_batches(requests, batch_size, max_length):
        scored = score_batch(model, batch, ablations, source_o_proj, softmax_dtype)
        for ablation_id, batch_answers in scored.items():
            for index, answer in zip(batch.owners, batch_answers, strict=True):
                answers[ablation_id][index] = answer
    return answers  # type: ignore[return-value]


@dataclass(frozen=True)
class Batch:
    """Distinct model inputs scored together, and the requests they answer."""

    inputs: list[tuple[int, ...]]  # one padded row each, longest first
    rows: list[tuple[int, int, tuple[int, ...]]]  # (row, input length, continuation) per request
    owners: list[int]  # the request index of each of ``rows``


def plan_batches(requests: Sequence[Request], batch_size: int, max_length: int) -> list[Batch]:
    """The batches the sweep runs, a function of the request set alone: distinct inputs
    (lm-eval's left truncation to ``max_length``) sorted longest first, then sliced. A resumed
    sweep of the requests an interrupted one left (whole batches of its tail) runs exactly the
    interrupted sweep's remaining batches, so every answer is computed in the same padded batch."""
    inputs = [(ctx + cont)[-(max_length + 1) :][:-1] for ctx, cont in requests]
    requests_of: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for index, tokens in enumerate(inputs):
        requests_of[tokens].append(index)
    unique = sorted(requests_of, key=lambda tokens: (-len(tokens), tokens))
    batches = []
    for start in range(0, len(unique), batch_size):
        chunk = unique[start : start + batch_size]
        rows, owners = [], []
        for row, tokens in enumerate(chunk):
            for index in requests_of[tokens]:
                rows.append((row, len(tokens), requests[index][1]))
                owners.append(index)
        batches.append(Batch(chunk, rows, owners))
    return batches


@torch.no_grad()
def score_batch(
    model,
    batch: Batch,
    ablations: Sequence[Ablation],
    source_o_proj: Mapping[int, torch.Tensor] | None,
    softmax_dtype: torch.dtype | None = None,
) -> dict[str, list[Answer]]:
    """Per ablation id, the answers of ``batch.rows``: the unablated model runs upward once and
    each ablation branches off at its first changed layer (base at the top)."""
    check_supported(model)
    layers = decoder_layers(model)
    branches = sorted((a.first_changed_layer(len(layers)), a.id, a) for a in ablations)
    input_ids = torch.zeros(len(batch.inputs), len(batch.inputs[0]), dtype=torch.long)
    for row, tokens in enumerate(batch.inputs):
        input_ids[row, : len(tokens)] = torch.tensor(tokens)
    device = model.get_input_embeddings().weight.device
    hidden, kwargs = first_layer_inputs(model, input_ids.to(device))
    reached, answers = 0, {}
    for first, _, ablation in branches:
        hidden = run_layers(layers, hidden, reached, first, kwargs)
        reached = first
        with ablated(model, ablation, source_o_proj):
            top = run_layers(layers, hidden, first, len(layers), kwargs)
        answers[ablation.id] = continuation_answers(model, top, batch.rows, softmax_dtype)
    return answers


def request_digest(request: tuple[str, str]) -> str:
    """A short stable name of an lm-eval request (context, continuation) for the progress file."""
    return hashlib.blake2b(json.dumps(list(request)).encode(), digest_size=16).hexdigest()


class ProgressFile:
    """Append-only JSON Lines, one record per line as ``<crc32 hex> <json>``.

    A record is written whole and flushed to the OS as soon as it is appended, so a killed
    process (SIGKILL, preemption, OOM) loses none; ``fsync`` runs at most every
    ``fsync_interval_s`` (a crashed machine loses at most that). Reading skips records whose
    checksum fails and cuts off a torn last line, so the next append starts a clean line.
    """

    def __init__(self, path: Path, fsync_interval_s: float = FSYNC_INTERVAL_S) -> None:
        self.path = Path(path)
        self.fsync_interval_s = fsync_interval_s
        self._handle: BinaryIO | None = None
        self._synced = time.monotonic()

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        whole = data.rfind(b"\n") + 1
        if whole < len(data):
            log.warning("%s: ignoring a torn last record (%d bytes)", self.path, len(data) - whole)
            with self.path.open("r+b") as handle:
                handle.truncate(whole)
        records, bad = [], 0
        for line in data[:whole].splitlines():
            checksum, _, payload = line.partition(b" ")
            try:
                if int(checksum, 16) != zlib.crc32(payload):
                    raise ValueError("checksum mismatch")
                records.append(json.loads(payload))
            except ValueError:
                bad += 1
        if bad:
            log.warning("%s: ignoring %d corrupt records", self.path, bad)
        return records

    def append(self, record: dict) -> None:
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = self.path.open("ab")
        payload = json.dumps(record, separators=(",", ":")).encode()
        self._handle.write(b"%08x %s\n" % (zlib.crc32(payload), payload))
        self._handle.flush()
        if time.monotonic() - self._synced >= self.fsync_interval_s:
            os.fsync(self._handle.fileno())
            self._synced = time.monotonic()

    def close(self, remove: bool = False) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if remove:
            self.path.unlink(missing_ok=True)


@dataclass
class PrefixSweep:
    """lm-eval log-likelihood answers for the ablation being evaluated; whatever it computes, it
    computes for every later ablation of the job too, in one shared-prefix pass. Keyed by the
    request's (context, continuation) strings, so later units skip tokenization as well.

    With ``progress_path``, every batch's answers (for every ablation it computed) are appended
    to that :class:`ProgressFile` as soon as the batch is done, and a new sweep of the same
    chunk starts from them: a resubmitted job after a kill computes only the batches that were
    cut off, the same batches with the same padding as an uninterrupted run (bit-identical
    answers). ``on_progress(what, done, total)`` hears of every batch."""

    model: Any
    ablations: list[Ablation]
    source_o_proj: Mapping[int, torch.Tensor] | None
    batch_size: int
    max_length: int
    softmax_dtype: torch.dtype | None = None
    current: Ablation | None = None
    progress_path: Path | None = None
    on_progress: Callable[[str, int, int], None] | None = None
    batches_computed: int = 0  # by this process
    batches_restored: int = 0  # read from the progress file
    _answers: dict[str, dict[tuple[str, str], Answer]] = field(default_factory=dict)
    _restored: dict[str, dict[str, Answer]] = field(default_factory=dict)
    _file: ProgressFile | None = None

    def __post_init__(self) -> None:
        if self.progress_path is None:
            return
        self._file = ProgressFile(self.progress_path)
        for record in self._file.read():
            for ablation_id, answers in record["answers"].items():
                restored = self._restored.setdefault(ablation_id, {})
                restored.update(
                    (key, (ll, greedy))
                    for key, (ll, greedy) in zip(record["keys"], answers, strict=True)
                )
            self.batches_restored += 1
        if self.batches_restored:
            log.info(
                "prefix sweep: restored %d batches from %s",
                self.batches_restored,
                self.progress_path,
            )

    def _known(self) -> dict[tuple[str, str], Answer]:
        assert self.current is not None, "set PrefixSweep.current before evaluating"
        return self._answers.setdefault(self.current.id, {})

    def missing(self, requests: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
        known = self._known()
        restored = self._restored.get(self.current.id, {})  # type: ignore[union-attr]
        missing = set()
        for request in requests:
            if request in known:
                continue
            answer = restored.get(request_digest(request)) if restored else None
            if answer is None:
                missing.add(request)
            else:
                known[request] = answer
        return missing

    def compute(self, requests: Sequence[tuple[tuple[str, str], list[int], list[int]]]) -> None:
        """Answer lm-eval's tokenized requests for the current and every later ablation."""
        pending = self.ablations[self.ablations.index(self.current) :]
        tokens = [(tuple(context), tuple(continuation)) for _, context, continuation in requests]
        batches = plan_batches(tokens, self.batch_size, self.max_length)
        log.info(
            "prefix sweep: %d batches (%d requests) for %d units",
            len(batches), len(requests), len(pending),
        )  # fmt: skip
        start = time.perf_counter()
        for done, batch in enumerate(batches, 1):
            scored = score_batch(self.model, batch, pending, self.source_o_proj, self.softmax_dtype)
            keys = [requests[index][0] for index in batch.owners]
            for ablation_id, answers in scored.items():
                self._answers.setdefault(ablation_id, {}).update(zip(keys, answers, strict=True))
            if self._file is not None:
                self._file.append({"keys": [request_digest(k) for k in keys], "answers": scored})
            self.batches_computed += 1
            if self.on_progress is not None:
                self.on_progress("sweep batches", done, len(batches))
        log.info(
            "prefix sweep: computed %d batches in %.1f s (%d restored from earlier runs)",
            len(batches), time.perf_counter() - start, self.batches_restored,
        )  # fmt: skip

    def answers(self, requests: Sequence[tuple[str, str]]) -> list[Answer]:
        known = self._known()
        return [known[request] for request in requests]

    def finish(self, ablation: Ablation) -> None:
        """Drop an evaluated ablation's answers."""
        self._answers.pop(ablation.id, None)
        self._restored.pop(ablation.id, None)

    def close(self, remove: bool = False) -> None:
        """Close the progress file; ``remove`` it once every unit's results are written (the
        request caches then hold every answer)."""
        if self._file is not None:
            self._file.close(remove)
