"""A shared-prefix sweep scores exactly like one plain lm-eval evaluation per ablation."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

from ablate.ablations import Ablation
from ablate.anatomy import Anatomy
from ablate.backends.hf import evaluate
from ablate.bench import LL_ABS, LL_REL
from ablate.job import Job
from ablate.sweep import plan_batches, score_batch, split_input
from conftest import DATA_DIR, SMOLLM2

MODEL = SMOLLM2 | {"dtype": "float32", "device": "cpu"}
# Every kind of ablation, in an order that is not sorted by first changed layer.
ABLATIONS = ["base", "layer13", "head29.4", "layer0", "kvgroup7.1", "oproj5_from_noisy",
             "oprojcum3_from_noisy", "layer29", "attn6", "mlp2"]  # fmt: skip
# Log-likelihoods agree as the benchmark requires: float32 rounding (ablate.bench says how much).
TOLERANCE = {"abs": LL_ABS, "rel": LL_REL}


def run(tmp_path: Path, embedded_dir, perturbed_dir, task: dict, ids, reuse: bool) -> dict:
    job = Job(
        model_dir=embedded_dir, model=MODEL, task=task, data_dir=str(DATA_DIR),
        source_dir=perturbed_dir, prefix_reuse=reuse,
    )  # fmt: skip
    out = tmp_path / ("sweep" if reuse else "plain")
    # Without reuse each ablation is applied to the whole model around its own lm-eval run.
    evaluate(job, [(Ablation.parse(a), out / a) for a in ids])
    return {
        a: (
            json.loads((out / a / "results.json").read_text())["results"],
            [json.loads(line) for line in (out / a / "samples.jsonl").read_text().splitlines()],
        )
        for a in ids
    }


@pytest.mark.slow  # full lm-eval evaluations, twice per ablation
@pytest.mark.parametrize(
    "task",
    [
        # Every value of the context an option (3), two contexts a batch.
        {
            "lm_eval_task": "kv_retrieval_short",
            "protocol": "loglikelihood",
            "limit": 4,
            "batch_size": 7,
        },
        # Four multi-token endings, two documents a batch (of different lengths).
        {
            "lm_eval_task": "hellaswag_local",
            "protocol": "loglikelihood",
            "limit": 3,
            "batch_size": 8,
        },
        # Left truncation into the contexts: an ending's context depends on its length.
        {
            "lm_eval_task": "hellaswag_local",
            "protocol": "loglikelihood",
            "limit": 3,
            "batch_size": 8,
            "max_length": 64,
        },
    ],
    ids=["kv_retrieval", "hellaswag", "hellaswag_truncated"],
)
def test_sweep_equals_plain_evaluation(tmp_path, embedded_dir, perturbed_dir, task, monkeypatch):
    options_per_context = []

    def planned(*args):
        batches = plan_batches(*args)
        options_per_context.extend(len(b.options) / len(b.contexts) for b in batches)
        return batches

    monkeypatch.setattr("ablate.sweep.plan_batches", planned)
    sweep = run(tmp_path, embedded_dir, perturbed_dir, task, ABLATIONS, reuse=True)
    assert max(options_per_context) > 1  # contexts were shared by their options
    plain = run(tmp_path, embedded_dir, perturbed_dir, task, ABLATIONS, reuse=False)
    distinct = set()
    for ablation in ABLATIONS:
        (sweep_results, sweep_samples), (plain_results, plain_samples) = (
            sweep[ablation],
            plain[ablation],
        )
        for name, metrics in plain_results.items():
            for key in ("acc,none", "acc_norm,none", "acc_ce,none"):
                if key in metrics:
                    assert sweep_results[name][key] == metrics[key], (ablation, name, key)
        assert len(sweep_samples) == len(plain_samples) > 0
        lls = []
        for fast, slow in zip(sweep_samples, plain_samples, strict=True):
            assert (fast["doc_id"], fast["acc"], fast["acc_ce"]) == (
                slow["doc_id"],
                slow["acc"],
                slow["acc_ce"],
            )
            for (fast_ll, fast_greedy), (slow_ll, slow_greedy) in zip(
                fast["filtered_resps"], slow["filtered_resps"], strict=True
            ):
                assert fast_ll == pytest.approx(slow_ll, **TOLERANCE), (ablation, fast["doc_id"])
                assert fast_greedy == slow_greedy
                lls.append(round(slow_ll, 3))
        distinct.add(tuple(lls))
    assert len(distinct) == len(ABLATIONS), "some ablations scored identically: nothing was ablated"


# ------------------------------------------------------- options scored on their shared context


def lm_eval_input(request, max_length: int) -> tuple[int, ...]:
    """HFLM's model input of a causal request: context + continuation, left-truncated to
    ``max_length``, its last token dropped."""
    context, continuation = request
    return (context + continuation)[-(max_length + 1) :][:-1]


def synthetic_requests() -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Contexts of 3 to 6 tokens with 1 to 7 options of 1 to 4 tokens, some requests twice."""
    requests = []
    for doc in range(9):
        context = tuple(range(100 + doc, 100 + doc + 3 + doc % 4))
        for option in range(1 + doc % 7):
            requests.append((context, tuple(range(7 + option, 8 + option + option % 4))))
    return requests + requests[:3]


@pytest.mark.parametrize("max_length", [2048, 6])  # 6: left truncation into the contexts
def test_batches_put_a_contexts_options_together_and_resume_identically(max_length):
    requests, batch_size = synthetic_requests(), 5
    batches = plan_batches(requests, batch_size, max_length)
    assert sorted(i for b in batches for i in b.owners) == list(range(len(requests)))
    batches_of = defaultdict(set)
    for number, batch in enumerate(batches):
        assert len(batch.options) <= batch_size
        for (option_index, continuation), index in zip(batch.rows, batch.owners, strict=True):
            context_row, option = batch.options[option_index]
            # Context + option is lm-eval's input, scored at the context's last position and
            # the option's (none for a one-token continuation).
            tokens = lm_eval_input(requests[index], max_length)
            assert batch.contexts[context_row] + option == tokens
            assert len(option) == len(continuation) - 1
            batches_of[batch.contexts[context_row]].add(number)
    if max_length == 2048:  # a context is split over batches only if it has > 5 options
        for context, numbers in batches_of.items():
            options = {split_input(r, max_length) for r in requests if r[0] == context}
            assert len(numbers) == -(-len(options) // batch_size), context
    assert max(len(b.options) / len(b.contexts) for b in batches) > 1
    # A resumed sweep of any tail of batches plans exactly that tail.
    for start in range(len(batches)):
        owners = [i for batch in batches[start:] for i in batch.owners]
        tail = plan_batches([requests[i] for i in owners], batch_size, max_length)
        assert [(b.contexts, b.options, b.rows) for b in tail] == [
            (b.contexts, b.options, b.rows) for b in batches[start:]
        ]


def hellaswag_requests(tokenizer, docs: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """HellaSwag requests tokenized as lm-eval's HFLM does (context, rest of context + ending)."""
    import datasets
    from lm_eval.tasks.hellaswag.utils import process_docs

    lines = (DATA_DIR / "hellaswag" / "validation.jsonl").read_text().splitlines()[:docs]
    requests = []
    for doc in process_docs(datasets.Dataset.from_list([json.loads(line) for line in lines])):
        context = tokenizer(doc["query"]).input_ids
        for choice in doc["choices"]:
            whole = tokenizer(doc["query"] + " " + choice).input_ids
            requests.append((tuple(context), tuple(whole[len(context) :])))
    return requests


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_options_on_shared_contexts_score_as_their_own_sequences(model, tokenizer, attention):
    model.set_attn_implementation(attention)
    requests = hellaswag_requests(tokenizer, 3)
    # One-token continuations are plain rows, here in a batch with a shared context.
    requests += [(context, continuation[:1]) for context, continuation in requests[::4]]
    units = [Ablation.parse(a) for a in ("base", "layer0", "head29.4", "attn6", "mlp2", "layer29")]
    for max_length in (2048, 60):  # 60: left truncation into the contexts
        answers = {}
        for share in (True, False):
            answers[share] = {a.id: [None] * len(requests) for a in units}
            batches = plan_batches(requests, 8, max_length, share)
            if not share:  # every request a plain sequence of its own
                assert all(b.options == [(row, ()) for row in range(8)] for b in batches[:-1])
            elif max_length == 2048:  # each context run once for its 4 endings and 1 token
                assert [len(b.contexts) for b in batches] == [1, 1, 1]
                assert [len(b.options) for b in batches] == [5, 5, 5]
            for batch in batches:
                for unit, scored in score_batch(
                    model, Anatomy.of(model), batch, units, None
                ).items():
                    for index, answer in zip(batch.owners, scored, strict=True):
                        answers[share][unit][index] = answer
        for unit in answers[True]:
            for (shared, shared_greedy), (alone, alone_greedy) in zip(
                answers[True][unit], answers[False][unit], strict=True
            ):
                assert shared == pytest.approx(alone, **TOLERANCE), (unit, max_length)
                assert shared_greedy == alone_greedy


@pytest.mark.slow
def test_bf16_sweep_rounds_no_more_than_lm_eval_itself(
    tmp_path, embedded_dir, perturbed_dir, monkeypatch
):
    """The paper's dtype: in bfloat16 the sweep's sums run in another order than lm-eval's
    HFLM's (shared context, packed options), so they round differently, as HFLM's own do
    between two batch sizes; the sweep moves no further from HFLM than that."""
    monkeypatch.setitem(MODEL, "dtype", "bfloat16")
    task = {"lm_eval_task": "hellaswag_local", "protocol": "loglikelihood", "limit": 3,
            "batch_size": 8}  # fmt: skip
    ids = ["base", "layer13", "head29.4", "oproj5_from_noisy"]
    sweep = run(tmp_path, embedded_dir, perturbed_dir, task, ids, reuse=True)
    plain = run(tmp_path, embedded_dir, perturbed_dir, task, ids, reuse=False)
    single = run(tmp_path / "b1", embedded_dir, perturbed_dir, task | {"batch_size": 1}, ids,
                 reuse=False)  # fmt: skip

    def largest_gap(a: dict, b: dict) -> float:
        return max(
            abs(x - y) / abs(y)
            for ablation in ids
            for one, other in zip(a[ablation][1], b[ablation][1], strict=True)
            for (x, _), (y, _) in zip(one["filtered_resps"], other["filtered_resps"], strict=True)
        )

    def flipped(a: dict, b: dict) -> int:  # documents whose prediction differs
        return sum(
            one["acc"] != other["acc"]
            for ablation in ids
            for one, other in zip(a[ablation][1], b[ablation][1], strict=True)
        )

    swept, batched = largest_gap(sweep, plain), largest_gap(single, plain)
    print(f"bf16, of a log-likelihood: sweep vs HFLM {swept:.2%} ({flipped(sweep, plain)} "
          f"flipped), HFLM batch 1 vs 8 {batched:.2%} ({flipped(single, plain)} flipped)")  # fmt: skip
    # Measured: 2.6% and 1.5% (0 and 0 predictions flipped of 12).
    assert swept <= 2 * batched and flipped(sweep, plain) <= flipped(single, plain)


@pytest.mark.slow
def test_rolling_loglikelihoods_equal_plain_evaluation(tmp_path, embedded_dir, perturbed_dir):
    """Perplexity (lm-eval's loglikelihood_rolling): documents longer than max_length roll over
    several windows, each an independent sequence the sweep scores under every ablation."""
    task = {"lm_eval_task": "gsm8k_text_local", "protocol": "loglikelihood_rolling",
            "limit": 4, "batch_size": 4, "max_length": 48}  # fmt: skip
    ids = ["base", "layer13", "layer0", "head29.4", "oproj5_from_noisy"]
    sweep = run(tmp_path, embedded_dir, perturbed_dir, task, ids, reuse=True)
    plain = run(tmp_path, embedded_dir, perturbed_dir, task, ids, reuse=False)
    perplexities = set()
    for ablation in ids:
        (fast_results, fast_samples), (slow_results, slow_samples) = (
            sweep[ablation],
            plain[ablation],
        )
        for key in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
            expected = slow_results["gsm8k_text_local"][key]
            assert fast_results["gsm8k_text_local"][key] == pytest.approx(expected, rel=1e-4)
        for fast, slow in zip(fast_samples, slow_samples, strict=True):
            (fast_ll, words), (slow_ll, slow_words) = (
                fast["word_perplexity"],
                slow["word_perplexity"],
            )
            assert fast_ll == pytest.approx(slow_ll, **TOLERANCE) and words == slow_words
        perplexities.add(round(slow_results["gsm8k_text_local"]["word_perplexity,none"], 2))
    assert len(perplexities) == len(ids), "some ablations scored identically: nothing was ablated"
