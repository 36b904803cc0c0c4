"""Log-likelihoods of one request list under many ablations, sharing the unablated prefix.

An ablation whose first changed layer is l leaves the hidden states entering layer l exactly as
in the unablated model. So each batch runs the unablated model upward once, and at each
ablation's first layer branches off: that ablation is applied (the same hooks and weight swaps as
:func:`ablate.ablations.ablated`) and only layers l.. are run (l+1.. for a skipped layer l, whose
output is its input). A layer sweep then costs about half the layer-forwards of one evaluation
per layer, and a head sweep at the last layer about one layer per head. Only continuation
positions go through the model's own head path (final norm, LM head, logit scaling).

Every block is called with the arguments the model's own forward gives it (:func:`layer_inputs`:
masks and rotary embeddings per layer type), and options are masked within each layer's sliding
window, so the sweep is the model's forward wherever that is proven on the model itself
(ablate.proof: its log-likelihoods equal one plain forward per unit; tests/test_zoo.py).

Scores follow lm-eval's ``HFLM._loglikelihood_tokens`` for causal models: the same left
truncation to ``max_length`` and (log-probability sum, is-greedy) per request. lm-eval scores a
document's k options as k sequences (context + option); here each layer runs on a batch's
distinct contexts once (right-padded rows), then on its options packed into rows without
padding between them (:func:`pack_options`). Each option's queries attend to its context's keys
and values (kept from the contexts' call of that layer, :class:`ContextKV`) and to its own, at
the positions they have in lm-eval's row. With causal attention and rotary positions that is the
same computation as k sequences (up to float rounding), ablation hooks included: both calls go
through the same modules. A continuation is scored at the context's last position, shared by all
of its options (one-token continuations need nothing else: lm-eval's one-token reuse), then at
the option's positions (the continuation but its last token).

Progress is durable per batch (:class:`ProgressFile`): a killed sweep's resubmission restores
the finished batches and runs only the rest, in the same batches, so its answers are bit-identical.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
import torch.nn.functional as F

from ablate.ablations import Ablation, ablated
from ablate.anatomy import CONTEXT_SHARING_KERNELS, Anatomy

Request = tuple[tuple[int, ...], tuple[int, ...]]  # (context tokens, continuation tokens)
Answer = tuple[float, bool]  # (sum of continuation log-probabilities, continuation is greedy)
FSYNC_INTERVAL_S = 10.0  # progress records reach the disk at least this often
log = logging.getLogger(__name__)


class _Captured(Exception):
    """Raised by the last block's stand-in to stop a forward pass once every block's inputs are
    known."""


# What a block calls its KV cache argument (LLaMA-likes, GPT-NeoX and Falcon, transformers 4).
CACHE_ARGUMENTS = ("past_key_values", "layer_past", "past_key_value", "cache")


def layer_inputs(
    model, anatomy: Anatomy, input_ids: torch.Tensor, **inputs: torch.Tensor | None
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Hidden states the model passes to its first block for ``input_ids`` (and ``inputs``:
    position ids, a 4D mask), and every block's other arguments by name (its mask, rotary
    embeddings, ... as the model's own forward builds them per layer type). The blocks are
    stood in for by recorders, and the forward is stopped at the last."""
    blocks = anatomy.blocks(model)
    hidden: list[torch.Tensor] = []
    calls: list[dict[str, Any]] = []

    def recorder(block):
        signature = inspect.signature(block.forward)

        def record(*args, **kwargs):
            bound = dict(signature.bind(*args, **kwargs).arguments)
            for name, parameter in signature.parameters.items():
                if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                    bound |= bound.pop(name, {})
            states = bound.pop(next(iter(signature.parameters)))
            hidden.append(states)
            calls.append(bound)
            if len(calls) == len(blocks):
                raise _Captured
            return (states,) if anatomy.tuple_blocks else states

        return record

    for block in blocks:
        block.forward = recorder(block)
    try:
        model(input_ids=input_ids, use_cache=False, **inputs)
    except _Captured:
        pass
    finally:
        for block in blocks:
            del block.forward
    return hidden[0], calls


class _Inject(torch.nn.Module):
    """Stands in for the whole block list: returns the given top-layer hidden states, as the
    model's blocks return theirs."""

    def __init__(self, output: torch.Tensor | tuple[torch.Tensor]) -> None:
        super().__init__()
        self.output = output

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor | tuple[torch.Tensor]:
        return self.output


def head_logits(model, anatomy: Anatomy, hidden: torch.Tensor) -> torch.Tensor:
    """Logits of the last block's hidden states (tokens x width) through the model's own path
    from there: its final norm, its head and whatever it does to logits (Cohere's and Granite's
    scaling, Gemma's soft-capping). The model's forward runs on placeholder tokens with its
    block list replaced by one module returning ``hidden``."""
    parent, _, name = anatomy.layers.rpartition(".")
    owner = model.get_submodule(parent)
    blocks = getattr(owner, name)
    # One position per row: the norm and the head act on each token alone, and the model builds
    # no tokens x tokens mask for the placeholder.
    output = (hidden[:, None],) if anatomy.tuple_blocks else hidden[:, None]
    setattr(owner, name, torch.nn.ModuleList([_Inject(output)]))
    try:
        placeholder = torch.zeros(len(hidden), 1, dtype=torch.long, device=hidden.device)
        return model(input_ids=placeholder, use_cache=False).logits[:, 0]
    finally:
        setattr(owner, name, blocks)


def sweepable(model) -> Anatomy:
    """The model's anatomy, or ValueError where the sweep's masks cannot express its attention
    (the workflow then scores with lm-eval's HFLM: ablate.backends.hf)."""
    anatomy = Anatomy.of(model)
    if blocker := anatomy.sweep_blocker:
        raise ValueError(f"the shared-prefix sweep cannot score this model: {blocker}")
    return anatomy


def shares_contexts(model) -> bool:
    """Whether the model's attention takes the masks that put options on a shared context (4D
    masks: sdpa, eager; block masks: flex_attention); other kernels (flash attention) get one
    plain sequence per option."""
    return model.config._attn_implementation in CONTEXT_SHARING_KERNELS


def continuation_answers(
    model,
    anatomy: Anatomy,
    spans: list[torch.Tensor],
    continuations: list[tuple[int, ...]],
    softmax_dtype,
) -> list[Answer]:
    """Score continuations from the last layer's hidden states at their scored positions. The
    batch's answers leave the device in one transfer (a GPU is not waited for per request)."""
    logits = head_logits(model, anatomy, torch.cat(spans))
    log_probs = F.log_softmax(logits, dim=-1, dtype=softmax_dtype)
    best = log_probs.amax(dim=-1)  # not argmax: ~6x slower on CPU
    targets = torch.tensor([token for cont in continuations for token in cont])
    targets = targets.to(log_probs.device)
    hits = log_probs.gather(1, targets[:, None])[:, 0]
    # lm-eval's argmax == target: the target holds the maximum, and no earlier token does (the
    # tie check runs where the target holds it, up to the largest such target).
    greedy = hits == best
    if (rows := greedy.nonzero()[:, 0]).numel():
        width = int(targets[rows].max())
        earlier = torch.arange(width, device=targets.device) < targets[rows, None]
        greedy[rows] = ~((log_probs[rows, :width] == best[rows, None]) & earlier).any(dim=1)
    hits, greedy = hits.cpu(), greedy.cpu()
    answers, offset = [], 0
    for cont in continuations:
        span, offset = slice(offset, offset + len(cont)), offset + len(cont)
        answers.append((float(hits[span].sum()), bool(greedy[span].all())))
    return answers


@torch.no_grad()
def sweep_loglikelihoods(
    model,
    requests: Sequence[Request],
    ablations: Sequence[Ablation],
    source: Mapping[str, torch.Tensor] | None,
    batch_size: int,
    max_length: int,
    softmax_dtype: torch.dtype | None = None,
) -> dict[str, list[Answer]]:
    """Answers per ablation id for every request, in request order."""
    answers: dict[str, list[Answer | None]] = {a.id: [None] * len(requests) for a in ablations}
    anatomy = sweepable(model)
    for batch in plan_batches(requests, batch_size, max_length, shares_contexts(model)):
        scored = score_batch(model, anatomy, batch, ablations, source, softmax_dtype)
        for ablation_id, batch_answers in scored.items():
            for index, answer in zip(batch.owners, batch_answers, strict=True):
                answers[ablation_id][index] = answer
    return answers  # type: ignore[return-value]


Tokens = tuple[int, ...]


@dataclass(frozen=True)
class Batch:
    """Contexts and options scored together, and the requests they answer."""

    contexts: list[Tokens]  # one row each (right-padded), run once for all their options
    options: list[tuple[int, Tokens]]  # (context row, tokens), packed into rows on the contexts
    rows: list[tuple[int, Tokens]]  # (option, continuation) per request
    owners: list[int]  # the request index of each of ``rows``


def split_input(
    request: Request, max_length: int, share_contexts: bool = True
) -> tuple[Tokens, Tokens]:
    """lm-eval's model input of a request (context + continuation, left-truncated to
    ``max_length``, last token dropped) as (context, option). The continuation is scored at the
    input's last positions: the context's last, where every option of the context is scored
    first, then the option's. Without ``share_contexts`` the context is all of the input."""
    context, continuation = request
    tokens = (context + continuation)[-(max_length + 1) :][:-1]
    if len(continuation) > len(tokens):
        raise ValueError(f"a continuation of {len(continuation)} tokens exceeds max_length")
    cut = len(tokens) - (len(continuation) - 1 if share_contexts else 0)
    return tokens[:cut], tokens[cut:]


def plan_batches(
    requests: Sequence[Request], batch_size: int, max_length: int, share_contexts: bool = True
) -> list[Batch]:
    """The batches the sweep runs, at most ``batch_size`` options each, a function of the
    request set alone: distinct (context, option) pairs sorted by context, longest first, then
    option, longest first, and cut greedily so that a context's options share a batch unless
    they do not fit in one (a context with more than ``batch_size`` options is split). Where a
    batch starts depends only on the pairs from the previous batch's start on, so a resumed
    sweep of the requests an interrupted one left (whole batches of its tail) runs exactly the
    interrupted sweep's remaining batches: every answer is computed in the same padded batch."""
    requests_of: dict[tuple[Tokens, Tokens], list[int]] = defaultdict(list)
    for index, request in enumerate(requests):
        requests_of[split_input(request, max_length, share_contexts)].append(index)
    pairs = sorted(requests_of, key=lambda p: (-len(p[0]), p[0], -len(p[1]), p[1]))
    options_of = Counter(context for context, _ in pairs)
    chunks: list[list[tuple[Tokens, Tokens]]] = []
    for position, (context, option) in enumerate(pairs):
        new_context = position == 0 or pairs[position - 1][0] != context
        if (
            not chunks
            or len(chunks[-1]) == batch_size
            or (new_context and len(chunks[-1]) + options_of[context] > batch_size)
        ):
            chunks.append([])
        chunks[-1].append((context, option))
    batches = []
    for chunk in chunks:
        contexts = list(dict.fromkeys(context for context, _ in chunk))
        rows, owners = [], []
        for option, pair in enumerate(chunk):
            for index in requests_of[pair]:
                rows.append((option, requests[index][1]))
                owners.append(index)
        options = [(contexts.index(context), option) for context, option in chunk]
        batches.append(Batch(contexts, options, rows, owners))
    return batches


def right_padded(rows: Sequence[Tokens]) -> torch.Tensor:
    ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    for row, tokens in enumerate(rows):
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return ids


@dataclass
class KeptKV:
    """Stands in for the KV cache in a decoder layer's attention on the contexts: keeps the
    layer's keys and values for the options' call that follows."""

    kv: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key: torch.Tensor, value: torch.Tensor, *_: Any, **__: Any):
        self.kv = key, value
        return key, value


@dataclass
class ContextKV:
    """Stands in for the KV cache in a decoder layer's attention on the packed options: every
    packed row gets all the batch's context keys and values (kept by the contexts' call of the
    same layer, padding included) before its own; the mask picks what each option sees."""

    kept: KeptKV
    rows: int

    def update(self, key: torch.Tensor, value: torch.Tensor, *_: Any, **__: Any):
        assert self.kept.kv is not None, "the contexts' call runs first"
        return tuple(
            torch.cat([kept.transpose(0, 1).flatten(1, 2).expand(self.rows, -1, -1, -1), own], 2)
            for kept, own in zip(self.kept.kv, (key, value), strict=True)
        )


def pack_options(lengths: Sequence[int]) -> tuple[int, int, list[tuple[int, int]]]:
    """Options packed into rows as wide as the longest (first fit, longest first), so short
    options pad no row: the rows, the width, and each option's (row, start)."""
    width, free, places = max(lengths), [], [(0, 0)] * len(lengths)
    for option in sorted(range(len(lengths)), key=lambda option: -lengths[option]):
        row = next((r for r, left in enumerate(free) if left >= lengths[option]), len(free))
        if row == len(free):
            free.append(width)
        places[option] = row, width - free[row]
        free[row] -= lengths[option]
    return len(free), width, places


def padded_tokens(batch: Batch) -> int:
    """Token positions one layer computes for ``batch``: contexts and packed options, padding
    included."""
    contexts = len(batch.contexts) * max(map(len, batch.contexts))
    rows, width, _ = pack_options([len(tokens) for _, tokens in batch.options])
    return contexts + rows * width


def option_inputs(model, anatomy: Anatomy, batch: Batch):
    """Hidden states and per-layer arguments of the first layer's call on the batch's options,
    packed into rows (no cache yet), and each option's (row, start). An option's queries see its
    context's keys and its own causally, at the positions they have in lm-eval's row (context +
    option), within each layer's sliding window; with causal attention and rotary positions that
    is the computation of its own sequence."""
    rows, width, places = pack_options([len(tokens) for _, tokens in batch.options])
    context_width = max(map(len, batch.contexts))
    own = len(batch.contexts) * context_width  # the first key column of a row's own tokens
    ids = torch.zeros(rows, width, dtype=torch.long)
    positions = torch.zeros(rows, width, dtype=torch.long)
    mask = torch.zeros(rows, width, own + width, dtype=torch.bool)
    mask[:, range(width), range(own, own + width)] = True  # padding sees itself: no empty row
    for (context, tokens), (row, start) in zip(batch.options, places, strict=True):
        span, offset = slice(start, start + len(tokens)), len(batch.contexts[context])
        ids[row, span] = torch.tensor(tokens)
        positions[row, span] = torch.arange(offset, offset + len(tokens))
        mask[row, span, context * context_width : context * context_width + offset] = True
        mask[row, span, own + start : own + start + len(tokens)] = torch.ones(
            len(tokens), len(tokens), dtype=torch.bool
        ).tril()
    # Each key column's position in its own sequence: how far a query looks back to it.
    key_positions = torch.cat(
        [torch.arange(context_width).repeat(len(batch.contexts)).expand(rows, -1), positions], 1
    )
    distance = positions[:, :, None] - key_positions[:, None, :]
    device = model.get_input_embeddings().weight.device
    masks = {
        window: _as_attention_mask(
            model, (mask if window is None else mask & (distance < window)).to(device)
        )
        for window in set(anatomy.windows)
    }
    hidden, calls = layer_inputs(
        model, anatomy, ids.to(device), position_ids=positions.to(device),
        attention_mask=masks[anatomy.windows[0]],
    )  # fmt: skip
    for call, window in zip(calls, anatomy.windows, strict=True):
        call["attention_mask"] = masks[window]
    return hidden, calls, places


def _as_attention_mask(model, allowed: torch.Tensor):
    """A (rows, queries, keys) boolean mask as the model's attention takes it: 4D, additive for
    eager attention (as transformers builds it); for flex_attention a block mask, whose kernel
    skips the tiles no query of a row may see (the other rows' contexts) and reads grouped K/V
    heads without repeating them."""
    implementation = model.config._attn_implementation
    if implementation == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        rows, queries, keys = allowed.shape
        return create_block_mask(
            lambda row, head, query, key: allowed[row, query, key],
            rows, None, queries, keys, device=allowed.device,
        )  # fmt: skip
    allowed = allowed[:, None]
    if implementation != "eager":
        return allowed
    dtype = model.get_input_embeddings().weight.dtype
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


def layer_calls(model, anatomy: Anatomy, batch: Batch):
    """Hidden states and per-layer arguments of the calls on ``batch`` (the contexts as causal
    rows, then the options packed on them, if any), and where each option is packed: (row,
    start)."""
    device = model.get_input_embeddings().weight.device
    hidden, calls = layer_inputs(model, anatomy, right_padded(batch.contexts).to(device))
    if not any(tokens for _, tokens in batch.options):
        return [hidden], [calls], []
    cache = next((name for name in CACHE_ARGUMENTS if name in calls[0]), None)
    if cache is None:
        raise ValueError(f"{type(anatomy.blocks(model)[0]).__name__} takes no KV cache argument")
    option_hidden, option_calls, places = option_inputs(model, anatomy, batch)
    kept = KeptKV()
    for context_call, option_call in zip(calls, option_calls, strict=True):
        context_call[cache], option_call[cache] = kept, ContextKV(kept, len(option_hidden))
    return [hidden, option_hidden], [calls, option_calls], places


def run_layers(
    blocks, hidden: list[torch.Tensor], start: int, stop: int, calls: list[list[dict]]
) -> list[torch.Tensor]:
    """Blocks ``start``..``stop`` on each call's hidden states in turn (contexts first), each
    block with its own arguments."""
    for index in range(start, stop):
        hidden = [
            _hidden_of(blocks[index](states, **arguments[index]))
            for states, arguments in zip(hidden, calls, strict=True)
        ]
    return hidden


def _hidden_of(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output  # blocks returning (hidden, ...)


@torch.no_grad()
def score_batch(
    model,
    anatomy: Anatomy,
    batch: Batch,
    ablations: Sequence[Ablation],
    source: Mapping[str, torch.Tensor] | None,
    softmax_dtype: torch.dtype | None = None,
) -> dict[str, list[Answer]]:
    """Per ablation id, the answers of ``batch.rows``: the unablated model runs upward once and
    each ablation branches off at its first changed layer (base at the top)."""
    blocks = anatomy.blocks(model)
    branches = sorted((a.first_changed_layer(len(blocks)), a.id, a) for a in ablations)
    hidden, calls, places = layer_calls(model, anatomy, batch)
    continuations = [continuation for _, continuation in batch.rows]
    reached, answers = 0, {}
    for first, _, ablation in branches:
        hidden = run_layers(blocks, hidden, reached, first, calls)
        reached, lowest = first, ablation.first_run_layer(len(blocks))
        with ablated(model, ablation, source, anatomy):
            top = run_layers(blocks, hidden, lowest, len(blocks), calls)
        spans = []
        for option, continuation in batch.rows:
            context, tokens = batch.options[option]
            end = len(batch.contexts[context])
            spans.append(top[0][context, end + len(tokens) - len(continuation) : end])
            if tokens:
                row, start = places[option]
                spans.append(top[1][row, start : start + len(tokens)])
        answers[ablation.id] = continuation_answers(
            model, anatomy, spans, continuations, softmax_dtype
        )
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
        if self._handle is not None and os.fstat(self._handle.fileno()).st_nlink == 0:
            log.warning(
                "%s was deleted while the sweep ran: the batches it held are lost to a resumed "
                "run; a new file keeps the batches from now on", self.path,
            )  # fmt: skip
            self._handle.close()
            self._handle = None
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
    source: Mapping[str, torch.Tensor] | None
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
        self.anatomy = sweepable(self.model)
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
        share = shares_contexts(self.model)
        batches = plan_batches(tokens, self.batch_size, self.max_length, share)
        log.info(
            "prefix sweep: %d batches (%d requests) for %d units",
            len(batches), len(requests), len(pending),
        )  # fmt: skip
        start = time.perf_counter()
        for done, batch in enumerate(batches, 1):
            scored = score_batch(
                self.model, self.anatomy, batch, pending, self.source, self.softmax_dtype
            )
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
