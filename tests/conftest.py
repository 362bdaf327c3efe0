"""Shared fixtures: real small models, loaded once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
if os.environ.get("PYTEST_XDIST_WORKER"):
    # parallel workers share the cores: one thread each, and for the processes the tests start
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
torch.manual_seed(0)


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The project's data beside the checkout; its absence fails the tests that need it (never a silent skip)."""
    if not (SHARED_DATA / "qa" / "squad_dev.jsonl").is_file():
        pytest.fail(f"{SHARED_DATA} is missing: the training and evaluation tests need the project's data at ../shared/data")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smol_path() -> str:
    from lclm_rag.hub import DEFAULT_LM, resolve_model

    return resolve_model(DEFAULT_LM)


@pytest.fixture(scope="session")
def tiny_encoder_path(tmp_path_factory, smol_path) -> str:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-encoder"), smol_path, 64, layers=6, seed=2)


@pytest.fixture(scope="session")
def encoder_parts(tiny_encoder_path):
    """The first 4 layers of a tiny random 6-layer Llama encoder (SmolLM2's tokenizer), shared by compressors of any ratio/pooling.

    Unit tests check shapes, masks and plumbing, which random weights show as well as trained ones;
    tests of trained behaviour load the packaged checkpoints instead.
    """
    from transformers import AutoTokenizer

    from lclm_rag.compressor import load_encoder

    return load_encoder(tiny_encoder_path, 4), AutoTokenizer.from_pretrained(tiny_encoder_path)


@pytest.fixture(scope="session")
def decoder_parts(tiny_models):
    """A tiny random Llama decoder of another width than the encoder (the projector maps between them)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_models[1], dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_models[1])


@pytest.fixture(scope="session")
def make_compressor(encoder_parts, tiny_encoder_path, tiny_models):
    from lclm_rag.compressor import LatentCompressor
    from lclm_rag.config import LatentConfig

    encoder, tokenizer = encoder_parts

    def make(**overrides) -> LatentCompressor:
        overrides.setdefault("encoder_layers", 4)
        overrides.setdefault("encoder", tiny_encoder_path)  # saved checkpoints name the weights they need
        overrides.setdefault("decoder", tiny_models[1])
        return LatentCompressor(LatentConfig(**overrides), encoder=encoder, tokenizer=tokenizer).eval()

    return make


@pytest.fixture(scope="session")
def model(make_compressor, decoder_parts):
    """An untrained latent model on the tiny random encoder and decoder at ratio 4: shapes and plumbing."""
    from lclm_rag.decoder import LatentDecoder
    from lclm_rag.model import LatentContextModel

    torch.manual_seed(0)
    compressor = make_compressor(ratio=4)
    decoder = LatentDecoder(compressor.config, model=decoder_parts[0], tokenizer=decoder_parts[1])
    return LatentContextModel(compressor.config, compressor=compressor, decoder=decoder).eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(model, tmp_path_factory) -> str:
    """``model`` saved as a checkpoint directory: for CLI and subprocess tests of plumbing, not quality."""
    return str(model.save_pretrained(tmp_path_factory.mktemp("tiny-checkpoint")))


@pytest.fixture(scope="session")
def packaged_model():
    """The packaged 1:4 release: for tests of trained behaviour (mark them slow)."""
    from lclm_rag.model import LatentContextModel

    return LatentContextModel.from_pretrained("smollm2-135m-r4")


PASSAGES = [
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
    "It is named after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889.",
    "Paris is the capital of France.",
    "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide to make glucose "
    "and oxygen. It takes place mainly in the chloroplasts of leaf cells, where chlorophyll absorbs light.",
    "Mount Everest, at 8,849 metres, is Earth's highest mountain above sea level.",
]


@pytest.fixture(scope="session")
def answer_in_each_position() -> list[tuple[int, list[str]]]:
    """(position, four passages): the one that names the Eiffel Tower's namesake among three unrelated, at each position."""
    unrelated = ["Photosynthesis turns sunlight, water and carbon dioxide into glucose and oxygen in the chloroplasts of leaf cells.",
                 "The Great Barrier Reef, off the coast of Queensland, is the largest coral reef system in the world.",
                 "Mount Everest, at 8,849 metres, is Earth's highest mountain above sea level, on the border of Nepal and China."]
    answer = "The Eiffel Tower in Paris is named after the engineer Gustave Eiffel, whose company designed and built it."
    return [(position, unrelated[:position] + [answer] + unrelated[position:]) for position in range(4)]


@pytest.fixture(scope="session")
def passages() -> list[str]:
    return list(PASSAGES)


@pytest.fixture(scope="session")
def embedder():
    from lclm_rag.embedding import Embedder

    return Embedder()


BACKENDS = ["edge", "qdrant-memory", "qdrant-path"]


def open_test_store(kind: str, tmp_path, name: str = "test"):
    from lclm_rag.store import LatentStore

    if kind == "edge":
        return LatentStore.open(name, path=tmp_path / "edge" / name)
    if kind == "qdrant-memory":
        return LatentStore.open(name, location=":memory:")
    return LatentStore.open(name, path=tmp_path / "qdrant-local", backend="qdrant")


def make_tiny_llama(path, smol_path, hidden: int, layers: int = 2, seed: int = 0) -> str:
    """A randomly initialised tiny Llama with SmolLM2's tokenizer: fast training tests."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(smol_path)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, smol_path):
    root = tmp_path_factory.mktemp("tiny")
    return make_tiny_llama(root / "enc", smol_path, 64, seed=0), make_tiny_llama(root / "dec", smol_path, 96, seed=1)
