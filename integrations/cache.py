"""Where latents wait between LlamaIndex components: a bounded map node id -> (latents, source).

Latents never ride inside node metadata (they would leak into prompts and docstores). The
retriever and postprocessor put them here; the synthesizer reads them. Components share the
process-wide ``SHARED_CACHE`` unless given their own, so standard LlamaIndex wiring
(``RetrieverQueryEngine(retriever, LatentSynthesizer(model), [LatentContextPostprocessor(...)])``)
needs no extra plumbing. A cache remembers whether a synthesizer reads it, so a postprocessor
whose latents nobody will read can say so.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class LatentCache:
    """Bounded (least recently used out) map node id -> (latents, "stored" | "computed")."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self.has_reader = False  # set by a LatentSynthesizer that reads this cache
        self._items: OrderedDict[str, tuple[torch.Tensor, str]] = OrderedDict()

    def put(self, node_id: str, latents: torch.Tensor, source: str) -> None:
        self._items[node_id] = (latents, source)
        self._items.move_to_end(node_id)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, node_id: str) -> tuple[torch.Tensor, str] | None:
        return self._items.get(node_id)


SHARED_CACHE = LatentCache()


def node_text(node) -> str:
    """A LlamaIndex node's text (or the object itself as text)."""
    return node.get_content() if hasattr(node, "get_content") else str(node)


def fill(cache: LatentCache, nodes, model, store=None, compress_missing: bool = True) -> None:
    """Put latents in ``cache`` for every node (a LlamaIndex ``BaseNode``) it lacks: the store's by
    node id (one round trip), else the node's text compressed now (flagged ``computed``) when
    ``compress_missing``."""
    from lclm_rag.store import id_for_node

    missing = [n for n in nodes if cache.get(n.node_id) is None]
    if missing and store is not None:
        by_point = {id_for_node(n.node_id): n.node_id for n in missing}
        for hit in store.retrieve(list(by_point), with_latents=True):
            cache.put(by_point[hit.id], hit.latents, "stored")
        missing = [n for n in missing if cache.get(n.node_id) is None]
    if missing and compress_missing:
        for n, lat in zip(missing, model.compress([node_text(n) for n in missing])):
            cache.put(n.node_id, lat, "computed")
