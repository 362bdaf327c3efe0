"""The LongLLMLingua baseline: the retrieved texts pruned to the latents' budget, in decoder tokens."""

from __future__ import annotations

import warnings
from collections.abc import Sequence


class _DecoderTokenCounter:
    """tiktoken's ``encode``/``decode`` over the decoder's tokenizer, so budgets count decoder positions."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def encode(self, text: str, **_) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids)


class LongLLMLingua:
    """LongLLMLingua (``llmlingua`` package) with a local small LM, budgeted in decoder tokens.

    ``PromptCompressor`` counts its budget with tiktoken's GPT-3.5 encoding, which it downloads;
    here the budget is the *decoder's* token count (the quantity that costs prefill time), so the
    counter is the decoder tokenizer and nothing is fetched. Settings follow LlamaIndex's
    ``LongLLMLinguaPostprocessor`` defaults (question-aware coarse ranking, sorted contexts,
    dynamic ratio 0.3, ``condition_compare``).
    """

    SETTINGS = dict(rank_method="longllmlingua", condition_in_question="after_condition", reorder_context="sort",
                    dynamic_context_compression_ratio=0.3, condition_compare=True, context_budget="+100")

    def __init__(self, model_name_or_path: str, decoder_tokenizer) -> None:
        from llmlingua import PromptCompressor

        from lclm_rag.hub import resolve_model

        compressor = PromptCompressor.__new__(PromptCompressor)  # its __init__ would fetch tiktoken data
        compressor.model_name, compressor.use_llmlingua2, compressor.open_api_config = str(model_name_or_path), False, {}
        compressor.retrieval_model = compressor.retrieval_model_name = None
        compressor.cache_bos_num, compressor.prefix_bos_num = 10, 100
        compressor.oai_tokenizer = _DecoderTokenCounter(decoder_tokenizer)
        compressor.load_model(resolve_model(model_name_or_path), "cpu", {})
        self.compressor = compressor

    def compress(self, question: str, texts: Sequence[str], target_tokens: int) -> str:
        with warnings.catch_warnings():  # llmlingua passes past_key_values, which transformers deprecates
            warnings.filterwarnings("ignore", message=".*past_key_values.*is deprecated", category=FutureWarning)
            result = self.compressor.compress_prompt(list(texts), question=question, target_token=target_tokens,
                                                     concate_question=False, **self.SETTINGS)
        return result["compressed_prompt"]
