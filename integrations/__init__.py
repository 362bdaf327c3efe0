"""Framework integrations (installed as ``lclm_rag.integrations``)."""
