"""Every query setting in one frozen dataclass: its one default and its one check.

`lclm_rag.rag.LatentRAG`, the command line's ``query`` flags, the evaluation and the LlamaIndex
classes all build a ``QueryConfig``, so a setting is defaulted and validated here and nowhere
else. Importing it loads no model (the command line checks its flags before any model loads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

from lclm_rag.errors import InputError
from lclm_rag.policies import POLICIES

AUTO = "auto"
TEXT = "text"
DEFAULT_POLICY = "score"  # --expand N: retrieval order, no model call
DEFAULT_AUTO_POLICY = "attention"  # --expand auto: the decoder's own attention decides (docs/benchmarks.md)


@dataclass(frozen=True)
class QueryConfig:
    """How one question is answered: retrieval, expansion, budgets, the auto decision, generation.

    ``expand``: passages read as raw text (the rest as latents), ``"auto"`` (answer from
    latents; below ``auto_threshold`` confidence expand ``auto_expand`` passages and answer
    again) or ``"text"`` (no latents: the best-ranked passages as text, as many as the budget
    holds; the plan that latents must beat at equal positions). ``policy``: which passages to expand (`lclm_rag.policies.POLICIES`); None is
    ``attention`` with ``expand="auto"`` and ``score`` otherwise. ``token_budget`` (decoder
    positions) and ``latency_budget_s`` (time to first token at the measured prefill cost) bound
    the prompt. ``compress_missing``: compress a passage the collection holds no latents for
    (flagged ``computed``) instead of reading it as text only.
    """

    top_k: int = 5
    expand: int | str = 0
    policy: str | None = None
    token_budget: int | None = None
    latency_budget_s: float | None = None
    auto_threshold: float | None = 0.5
    auto_expand: int = 1
    max_new_tokens: int = 64
    compress_missing: bool = True

    def __post_init__(self) -> None:
        if not _count(self.top_k) or self.top_k < 1:
            raise InputError(f"top_k must be a positive integer, got {self.top_k!r}")
        if self.expand not in (AUTO, TEXT) and (not _count(self.expand) or self.expand < 0):
            raise InputError(f"expand must be a number of passages (>= 0), 'auto' or 'text', got {self.expand!r}")
        if self.policy is not None and self.policy not in POLICIES:
            raise InputError(f"expand policy must be one of {POLICIES}, got {self.policy!r}")
        if self.token_budget is not None and (not _count(self.token_budget) or self.token_budget < 1):
            raise InputError(f"token_budget must be a positive number of positions, got {self.token_budget!r}")
        if self.latency_budget_s is not None:
            if isinstance(self.latency_budget_s, bool) or not isinstance(self.latency_budget_s, (int, float)):
                raise InputError(f"latency_budget_s must be a number of seconds, got {self.latency_budget_s!r}")
            if not math.isfinite(self.latency_budget_s) or self.latency_budget_s <= 0:
                raise InputError(f"latency_budget_s must be > 0 and finite, got {self.latency_budget_s}")
        if self.auto_threshold is not None and (isinstance(self.auto_threshold, bool) or not isinstance(self.auto_threshold, (int, float))
                                                or not 0.0 <= self.auto_threshold <= 1.0):
            raise InputError(f"the auto-expand threshold must be in [0, 1], got {self.auto_threshold}")
        if not _count(self.auto_expand) or self.auto_expand < 1:
            raise InputError(f"auto_expand must be at least 1 passage, got {self.auto_expand!r}")
        if not _count(self.max_new_tokens) or self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {self.max_new_tokens!r}")

    @property
    def auto(self) -> bool:
        return self.expand == AUTO

    @property
    def text_only(self) -> bool:
        return self.expand == TEXT

    @property
    def expand_policy(self) -> str:
        """The policy in force: the one given, else the default for this kind of expansion."""
        return self.policy or (DEFAULT_AUTO_POLICY if self.auto else DEFAULT_POLICY)

    def replace(self, **changes: Any) -> "QueryConfig":
        return replace(self, **changes)

    @classmethod
    def split(cls, settings: dict[str, Any]) -> tuple["QueryConfig", dict[str, Any]]:
        """A config from the keys of ``settings`` that are query settings, and the rest (e.g. generation settings)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in settings.items() if k in names}), {k: v for k, v in settings.items() if k not in names}


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
