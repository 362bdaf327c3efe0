"""Ingestion: files and LlamaIndex nodes into a latent store (installed as ``lclm_rag.ingest``)."""

from lclm_rag.ingest.pipeline import Ingestor, IngestReport, SourceDocument, read_file

__all__ = ["IngestReport", "Ingestor", "SourceDocument", "read_file"]
