"""The lm-eval model the planner counts a task's requests with (ablate.tokens): its own module,
as it imports lm-eval, which the workflow does not load when it reads the counts."""

from __future__ import annotations

from typing import Any

from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window


def pair_strings(context: str, continuation: str) -> list[str]:
    """The strings lm-eval's ``TemplateLM`` encodes for a (context, continuation) request: the
    whole and the context, trailing spaces moved from the context to the continuation; or the
    continuation alone after an empty context."""
    if context == "":
        return [continuation]
    return [context + continuation, context.rstrip()]


class RequestCounter(TemplateLM):
    """An lm-eval model that records the token ids of the requests it gets and answers dummies;
    lm-eval's own ``TemplateLM`` encodes them (as ``HFLM`` does). Every string a batch of
    requests needs is encoded first in one call of the fast tokenizer (tens of thousands a
    second, not one by one), and lm-eval's encoding then reads them from that cache."""

    def __init__(self, tokenizer, task: dict[str, Any], max_length: int) -> None:
        super().__init__()
        self.tokenizer, self.max_length = tokenizer, max_length
        self.chat_template_args = (
            {"enable_thinking": task["enable_thinking"]} if "enable_thinking" in task else {}
        )
        self.scored: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
        self.prompts: list[tuple[list[int], int]] = []  # (prompt tokens, max_gen_toks)
        self.encoded: dict[tuple[str, bool], list[int]] = {}

    def encode_all(self, strings: list[str], add_special_tokens: bool = False) -> None:
        """Encode ``strings`` in one batch call into the cache :meth:`tok_encode` reads."""
        new = list(dict.fromkeys(s for s in strings if (s, add_special_tokens) not in self.encoded))
        if new:
            ids = self.tokenizer(new, add_special_tokens=add_special_tokens).input_ids
            self.encoded.update(zip(((s, add_special_tokens) for s in new), ids, strict=True))

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template if chat_template else None

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
            **self.chat_template_args,
        )

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs
    ) -> list[int]:
        key = (string, bool(add_special_tokens))
        if key not in self.encoded:
            self.encoded[key] = self.tokenizer(string, add_special_tokens=key[1]).input_ids
        return self.encoded[key]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        self.encode_all([s for request in requests for s in pair_strings(*request.args)])
        return super().loglikelihood(requests, disable_tqdm=True)

    def _loglikelihood_tokens(self, requests, **kwargs) -> list[tuple[float, bool]]:
        self.scored.extend((tuple(context), tuple(cont)) for _, context, cont in requests)
        return [(0.0, False)] * len(requests)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        self.encode_all([request.args[0] for request in requests])
        for request in requests:
            context, settings = request.args
            self.prompts.append((self.tok_encode(context), settings.get("max_gen_toks", 256)))
        return [""] * len(requests)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        # The windows HFLM scores, one per max_length tokens, each after a one-token context.
        self.encode_all([request.args[0] for request in requests])
        for request in requests:
            windows = get_rolling_token_windows(
                token_list=self.tok_encode(request.args[0]),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            self.scored.extend(
                (tuple(context), tuple(continuation))
                for context, continuation in map(make_disjoint_window, windows)
            )
        return [0.0] * len(requests)
