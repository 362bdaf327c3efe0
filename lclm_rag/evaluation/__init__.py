"""Evaluation: QA metrics, reading-only (gold passage) and end-to-end RAG evaluations, restoration,
paired comparisons and benchmarks. Sits on top of the model and RAG layers; needs no LlamaIndex.

Modules: ``metrics`` (scores), ``gold`` (gold-passage QA), ``rag`` (end-to-end modes),
``restoration`` (rebuilding passages from latents), ``compare`` (paired differences),
``llmlingua`` (the LongLLMLingua baseline), ``measure`` and ``bench`` (speed), ``plots``.
"""

from lclm_rag.evaluation.compare import GROUPINGS, answer_kind, answer_position, paired_comparison
from lclm_rag.evaluation.gold import GOLD_MODES, evaluate_gold_passage, run_gold_eval
from lclm_rag.evaluation.metrics import QAScores, answer_contained, exact_match, f1_score, normalize_answer, score_predictions
from lclm_rag.evaluation.rag import RAG_MODES, run_rag_eval
from lclm_rag.evaluation.restoration import restoration_accuracy, restoration_breakdown

__all__ = ["GOLD_MODES", "GROUPINGS", "RAG_MODES", "QAScores", "answer_contained", "answer_kind", "answer_position", "evaluate_gold_passage", "exact_match", "f1_score",
           "normalize_answer", "paired_comparison", "restoration_accuracy", "restoration_breakdown", "run_gold_eval",
           "run_rag_eval", "score_predictions"]
