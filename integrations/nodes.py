"""How a passage's latents travel between LlamaIndex components: on the node itself.

``LatentNode`` is a ``TextNode`` with two private attributes, the latents and where they came
from. Why there, within LlamaIndex's contracts:

- a node is what every retriever, postprocessor and synthesizer hands on (``NodeWithScore.node``
  is any ``BaseNode``; a ``TextNode`` subclass is accepted wherever a ``TextNode`` is), so the
  latents go wherever the node goes, per query, with no map beside it and no process-wide state;
- pydantic private attributes are not fields: they never enter ``metadata`` (so never a prompt, an
  embedding or a metadata filter), are never serialised (docstores, ingestion caches and callback
  payloads see the plain ``TextNode``, and ``class_name`` says so), and survive ``model_copy``;
- a node that lost them on the way (serialised and read back, rebuilt by a foreign component) is
  still answered: `lclm_rag.rag.LatentRAG.complete` fetches its latents from the store by node id
  or compresses its text, flagged ``computed``.
"""

from __future__ import annotations

from typing import Any

import torch
from llama_index.core.schema import BaseNode, NodeWithScore, TextNode
from pydantic import PrivateAttr

from lclm_rag.planning import Passage


class LatentNode(TextNode):
    """A ``TextNode`` carrying its passage's encoder-side latents (see the module docstring for why)."""

    _latents: Any = PrivateAttr(default=None)
    _latent_source: str = PrivateAttr(default="none")  # "stored" | "computed" | "none"
    _read: bool = PrivateAttr(default=False)  # set when a synthesizer read the latents

    @classmethod
    def class_name(cls) -> str:
        return "TextNode"  # serialised, it is the plain node it extends (the latents are not kept)

    @classmethod
    def carrying(cls, node: TextNode, latents: torch.Tensor | None, source: str) -> "LatentNode":
        """The same node (id, text, metadata, relationships, everything serialisable) with latents on it."""
        out = node if isinstance(node, LatentNode) else cls(**{name: getattr(node, name) for name in TextNode.model_fields})
        out._latents, out._latent_source = latents, source if latents is not None else "none"
        return out


def latents_of(node: BaseNode) -> tuple[torch.Tensor | None, str]:
    """A node's carried latents and their source, or (None, "none")."""
    if isinstance(node, LatentNode) and node._latents is not None:
        return node._latents, node._latent_source
    return None, "none"


def node_text(node: BaseNode) -> str:
    return node.get_content() if hasattr(node, "get_content") else str(node)


def to_passage(scored: NodeWithScore) -> Passage:
    """A retrieved node as the query path reads it (its carried latents, if any)."""
    node = scored.node
    latents, source = latents_of(node)
    return Passage(node.node_id, node_text(node), scored.score, latents, source, doc_id=(node.metadata or {}).get("doc_id"),
                   payload=node.metadata)


def to_node(passage: Passage) -> NodeWithScore:
    """A stored passage as a node: its payload as metadata kept out of prompts and embeddings, its latents carried."""
    meta = {k: v for k, v in (passage.payload or {}).items() if k != "text"}
    node = LatentNode(id_=passage.id, text=passage.text, metadata=meta, excluded_llm_metadata_keys=list(meta),
                      excluded_embed_metadata_keys=list(meta))
    node._latents, node._latent_source = passage.latents, passage.latent_source if passage.latents is not None else "none"
    return NodeWithScore(node=node, score=passage.score)


def with_latents(scored: NodeWithScore, passage: Passage) -> NodeWithScore:
    """``scored`` with ``passage``'s latents on its node (the same score; a non-text node is left as it is)."""
    if not isinstance(scored.node, TextNode) or passage.latents is None:
        return scored
    return NodeWithScore(node=LatentNode.carrying(scored.node, passage.latents, passage.latent_source), score=scored.score)
