"""What a vLLM server is sent for one prompt: token ids where a position is one of the decoder's own
token embeddings, embeddings only where it is not (latents, boundary embeddings).

Engines receive a prompt as one (positions, hidden) tensor. Its text positions (chat template,
instruction, question, expanded passages) are exact rows of the decoder's input-embedding table,
so they are found by matching rows and sent as text that the server tokenizes back to the same
ids; everything else travels as ``prompt_embeds`` content parts of one chat message (vLLM >= 0.32).
The server renders that message with `PROMPT_TEMPLATE` (the parts as they are, no roles added),
which the serving copy carries as `TEMPLATE_FILE`. A request is then a fraction of the size, and
the server's prefix cache sees the shared template and question as tokens.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import torch

PROMPT_TEMPLATE = "{%- for message in messages -%}{%- for part in message['content'] -%}{{ part['text'] }}{%- endfor -%}{%- endfor -%}"
TEMPLATE_FILE = "lclm_rag_prompt.jinja"  # in the serving copy: `vllm serve COPY --chat-template COPY/lclm_rag_prompt.jinja`
_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def encode_embeds(embeds: torch.Tensor, dtype: torch.dtype) -> str:
    """``torch.save`` bytes, base64: the format vLLM's server loads (with ``weights_only``). A copy, as
    ``torch.save`` of a view writes the whole tensor it views."""
    buffer = io.BytesIO()
    torch.save(embeds.detach().to("cpu", dtype).clone(memory_format=torch.contiguous_format), buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class TokenTable:
    """Finds the prompt positions that are rows of the decoder's input-embedding table, and which
    token each is: an exact integer hash of each row's bits, confirmed by comparing the rows."""

    def __init__(self, weight: torch.Tensor, tokenizer: Any) -> None:
        self.weight, self.tokenizer = weight.detach().to("cpu").contiguous(), tokenizer
        self._coef = torch.randint(-(2**62), 2**62, (self.weight.shape[1],), dtype=torch.int64,
                                   generator=torch.Generator().manual_seed(0))
        keys = torch.cat([self._keys(rows) for rows in self.weight.split(4096)])
        self._sorted, self._order = keys.sort()

    def _keys(self, rows: torch.Tensor) -> torch.Tensor:
        # integer arithmetic (wrapping) is exact and order-free: a row's key never depends on its batch
        return (rows.contiguous().view(_BITS[rows.element_size()]).to(torch.int64) * self._coef).sum(dim=1)

    def token_ids(self, prompt: torch.Tensor) -> list[int | None]:
        """Per position, the token whose embedding it is exactly, or None."""
        rows = prompt.detach().to("cpu")
        if rows.dtype != self.weight.dtype or rows.shape[-1] != self.weight.shape[1]:
            return [None] * len(rows)
        keys = self._keys(rows)
        at = torch.searchsorted(self._sorted, keys).clamp(max=len(self._sorted) - 1)
        ids = self._order[at]
        hit = (self._sorted[at] == keys) & (self.weight[ids] == rows).all(dim=1)
        return [int(i) if h else None for i, h in zip(ids.tolist(), hit.tolist())]

    def _as_text(self, ids: list[int]) -> str | None:
        """The text the server's tokenizer turns back into exactly ``ids``, or None."""
        text = self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return text if self.tokenizer(text, add_special_tokens=False)["input_ids"] == ids else None

    def parts(self, prompt: torch.Tensor, dtype: torch.dtype) -> list[dict[str, str]]:
        """Chat content parts for one prompt: text for runs of token positions, ``prompt_embeds``
        for the rest (and for any run of tokens whose text would not tokenize back to the same ids)."""
        ids = self.token_ids(prompt)
        runs: list[tuple[str | None, int, int]] = []  # (text or None for embeddings, start, end)
        start = 0
        for end in range(1, len(ids) + 1):
            if end < len(ids) and (ids[end] is None) == (ids[start] is None):
                continue
            text = None if ids[start] is None else self._as_text(ids[start:end])
            if runs and text is None and runs[-1][0] is None:
                runs[-1] = (None, runs[-1][1], end)  # a run of tokens that must go as embeddings joins its neighbour
            else:
                runs.append((text, start, end))
            start = end
        return [{"type": "text", "text": text} if text is not None
                else {"type": "prompt_embeds", "data": encode_embeds(prompt[a:b], dtype)} for text, a, b in runs]


def probe_message(table: TokenTable, hidden: int, dtype: torch.dtype) -> tuple[list[dict], list[int], list[int]]:
    """A two-position embeddings part between two texts, and the ids each text must come back as:
    a server that renders it with `PROMPT_TEMPLATE` tokenizes it to ``before + [x, x] + after``."""
    before, after = "<|im_start|>user\nlclm-rag probe:", " the end.<|im_end|>\n"
    content = [{"type": "text", "text": before}, {"type": "prompt_embeds", "data": encode_embeds(torch.zeros(2, hidden), dtype)},
               {"type": "text", "text": after}]
    tok = table.tokenizer
    return ([{"role": "user", "content": content}], tok(before, add_special_tokens=False)["input_ids"],
            tok(after, add_special_tokens=False)["input_ids"])


def renders_verbatim(tokens: list[int], before: list[int], after: list[int]) -> bool:
    """Whether the probe came back as its own ids around two copies of one placeholder."""
    middle = tokens[len(before):len(tokens) - len(after)]
    return (tokens[:len(before)] == before and tokens[len(tokens) - len(after):] == after and len(middle) == 2
            and middle[0] == middle[1])


def mixed_prompts_refusal(client: Any, url: str, model: str, table: TokenTable, dtype: torch.dtype) -> str | None:
    """None when the server at ``url`` (an ``httpx.Client`` reaches it) renders a chat message of
    text and embeddings parts as the parts themselves, asked through its ``/tokenize`` of a probe
    message; otherwise why not, for the one log line of the fallback."""
    messages, before, after = probe_message(table, table.weight.shape[1], dtype)
    try:
        reply = client.post(f"{url.removesuffix('/v1')}/tokenize", json={"model": model, "messages": messages})
        if reply.status_code != 200:
            return f"does not take embeddings in chat messages ({reply.status_code}: {reply.text[:120]})"
        if not renders_verbatim(reply.json().get("tokens", []), before, after):
            return f"renders chat messages with another template (start it with --chat-template <serving copy>/{TEMPLATE_FILE})"
    except Exception as exc:  # a proxy, an older server: anything that does not answer the probe as vLLM >= 0.32 does
        return f"could not be asked about mixed prompts ({type(exc).__name__}: {exc})"
    return None


__all__ = ["PROMPT_TEMPLATE", "TEMPLATE_FILE", "TokenTable", "encode_embeds", "mixed_prompts_refusal", "probe_message",
           "renders_verbatim"]
