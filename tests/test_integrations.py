import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lclm_rag.ingest import Ingestor
from lclm_rag.integrations.llama_index import LatentContextPostprocessor, LatentNode, LatentQueryEngine, LatentRetriever
from lclm_rag.integrations.nodes import latents_of

from lclm_rag.errors import CompressorMismatchError, ConfigError, InputError, StoreError
from lclm_rag.store import LatentStore, id_for_node

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "examples" / "docs"
QUESTION = "Who is the Eiffel Tower named after?"


@pytest.fixture(scope="module")
def store(tmp_path_factory, model, embedder):
    path = tmp_path_factory.mktemp("store") / "docs"
    st = LatentStore.open("docs", path=path)
    Ingestor(st, model.compressor, embedder, chunk_tokens=64, overlap=0).ingest_paths([DOCS], progress=False)
    yield st
    st.close()


def test_retriever_returns_nodes_scores_and_stored_latents(store, embedder):
    retriever = LatentRetriever(store, embedder, similarity_top_k=3)
    nodes = retriever.retrieve(QUESTION)
    assert len(nodes) == 3 and nodes[0].score >= nodes[1].score >= nodes[2].score
    assert "eiffel" in nodes[0].node.metadata["doc_id"]
    stored = {p.id: p for p in store.retrieve([n.node.node_id for n in nodes])}
    for n in nodes:
        latents, source = latents_of(n.node)  # carried on the node: no map beside it, nothing process-wide
        assert source == "stored" and torch.equal(latents, stored[n.node.node_id].latents)
        assert "latent" not in n.node.metadata and "latent" not in n.node.model_dump_json()  # never in prompts or docstores


def test_engine_sync_async_stream_agree_and_never_encode(store, embedder, model):
    engine = LatentQueryEngine.from_args(retriever=LatentRetriever(store, embedder, similarity_top_k=3), model=model, max_new_tokens=12)
    calls = model.compressor.encoder_calls
    sync = engine.query(QUESTION)
    asynchronous = asyncio.run(engine.aquery(QUESTION))
    engine.streaming = True
    streamed = engine.query(QUESTION)
    text = "".join(streamed.response_gen).strip()
    assert model.compressor.encoder_calls == calls, "a query must not run the encoder"
    assert sync.response == asynchronous.response == text and sync.response
    assert [n.node.node_id for n in sync.source_nodes] == [n.node.node_id for n in streamed.source_nodes]
    meta = sync.metadata
    assert [p["mode"] for p in meta["passages"]] == ["latent"] * 3 and meta["expanded"] == []
    assert meta["prompt_positions"] > 0 and {"retrieve_s", "generate_s", "total_s"} <= meta["timings"].keys()


def test_expand_changes_what_the_decoder_receives(store, embedder, model):
    retriever = LatentRetriever(store, embedder, similarity_top_k=3)
    skim = LatentQueryEngine.from_args(retriever=retriever, model=model, max_new_tokens=4)
    expanded = LatentQueryEngine.from_args(retriever=retriever, model=model, expand=1, max_new_tokens=4)
    a, b = skim.query(QUESTION), expanded.query(QUESTION)
    top = b.source_nodes[0]
    assert b.metadata["expanded"] == [top.node.node_id]
    assert [p["mode"] for p in b.metadata["passages"]] == ["text", "latent", "latent"]
    latent_positions = a.metadata["passages"][0]["latent_positions"]
    text_positions = len(model.decoder.text_ids(top.node.get_content()))
    grown = b.metadata["prompt_positions"] - a.metadata["prompt_positions"]
    assert abs(grown - (text_positions - latent_positions)) <= 2  # inline tokenization may merge a token at the edges
    # a latency budget one position short of that prompt keeps the expansion and drops the lowest-ranked latents;
    # a roomy one lets expand=3 expand all
    from lclm_rag.planning import prefill_cost

    cost = prefill_cost(model)
    short = b.metadata["prompt_positions"] - 1
    tight = LatentQueryEngine.from_args(retriever=retriever, model=model, expand=1, max_new_tokens=4,
                                        latency_budget_s=cost.fixed_s + cost.per_position_s * (short + 0.5)).query(QUESTION)
    assert tight.metadata["expanded"] == [top.node.node_id] and tight.metadata["prompt_positions"] <= short
    assert [p["mode"] for p in tight.metadata["passages"]] == ["text", "latent", "dropped"]
    roomy = LatentQueryEngine.from_args(retriever=retriever, model=model, expand=3, max_new_tokens=4, latency_budget_s=1e6)
    assert len(roomy.query(QUESTION).metadata["expanded"]) == 3


def test_postprocessor_on_a_plain_llamaindex_qdrant_index(tmp_path, model, embedder):
    from llama_index.core import StorageContext, VectorStoreIndex
    from llama_index.core.schema import TextNode
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding
    from llama_index.vector_stores.qdrant import QdrantVectorStore
    from qdrant_client import QdrantClient

    from lclm_rag.hub import DEFAULT_EMBEDDER, resolve_model

    embed_model = HuggingFaceEmbedding(model_name=resolve_model(DEFAULT_EMBEDDER))
    texts = ["The Eiffel Tower is named after Gustave Eiffel.", "Paris is the capital of France.",
             "Coral polyps build the Great Barrier Reef.", "Apollo 11 landed on the Moon in 1969."]
    nodes = [TextNode(text=t, metadata={"n": i}) for i, t in enumerate(texts)]
    client = QdrantClient(location=":memory:")
    index = VectorStoreIndex(nodes, storage_context=StorageContext.from_defaults(vector_store=QdrantVectorStore(client=client, collection_name="c")),
                             embed_model=embed_model)
    latent_store = LatentStore.open("lat", location=":memory:")
    Ingestor(latent_store, model.compressor, embedder).ingest_documents(nodes[:3], split=False)  # the 4th is never stored

    post = LatentContextPostprocessor(model=model, store=latent_store)
    assert LatentContextPostprocessor.class_name() == "LatentContextPostprocessor"
    retrieved = index.as_retriever(similarity_top_k=4).retrieve("What did Apollo 11 do?")
    before = [(n.node.node_id, n.score, dict(n.node.metadata)) for n in retrieved]
    calls = model.compressor.encoder_calls
    out = post.postprocess_nodes(retrieved)
    assert [(n.node.node_id, n.score, dict(n.node.metadata)) for n in out] == before  # the same nodes, in order
    assert all(isinstance(n.node, LatentNode) and n.node.get_content() == r.node.get_content() for n, r in zip(out, retrieved))
    sources = {n.node.get_content(): latents_of(n.node)[1] for n in out}
    assert sources == {texts[0]: "stored", texts[1]: "stored", texts[2]: "stored", texts[3]: "computed"}
    assert model.compressor.encoder_calls == calls + 1  # only the node the collection lacks
    node0 = next(n for n in out if n.node.get_content() == texts[0])
    stored0 = latent_store.retrieve([id_for_node(node0.node.node_id)])[0]
    assert torch.equal(latents_of(node0.node)[0], stored0.latents)
    engine = LatentQueryEngine.from_args(retriever=index.as_retriever(similarity_top_k=4), node_postprocessors=[post], model=model, max_new_tokens=4)
    response = engine.query("What did Apollo 11 do?")
    assert len(response.source_nodes) == 4 and sorted(p["latent_source"] for p in response.metadata["passages"]) == ["computed", "stored", "stored", "stored"]

    # LlamaIndex's own engine with the latent synthesizer: the same answer from the same latents
    from lclm_rag.integrations.llama_index import LatentSynthesizer
    from llama_index.core.query_engine import RetrieverQueryEngine
    from llama_index.core.schema import QueryBundle

    synthesizer = LatentSynthesizer(model, max_new_tokens=4)
    standard = RetrieverQueryEngine(retriever=index.as_retriever(similarity_top_k=4), response_synthesizer=synthesizer,
                                    node_postprocessors=[LatentContextPostprocessor(model, store=latent_store)])
    own = standard.query("What did Apollo 11 do?")
    assert own.response == response.response and own.metadata["passages"] == response.metadata["passages"]
    streamed = RetrieverQueryEngine(retriever=index.as_retriever(similarity_top_k=4),
                                    response_synthesizer=LatentSynthesizer(model, max_new_tokens=4, streaming=True),
                                    node_postprocessors=[LatentContextPostprocessor(model, store=latent_store)])
    assert "".join(streamed.query("What did Apollo 11 do?").response_gen).strip() == response.response
    nodes = standard.retrieve(QueryBundle("What did Apollo 11 do?"))  # postprocessed: the nodes carry their latents
    assert asyncio.run(synthesizer.asynthesize("What did Apollo 11 do?", nodes)).response == response.response
    plain = index.as_retriever(similarity_top_k=4).retrieve("What did Apollo 11 do?")  # latents lost on the way: compressed now
    assert LatentSynthesizer(model, max_new_tokens=4).synthesize("What did Apollo 11 do?", plain).metadata["passages"][0]["latent_source"] == "computed"
    client.close()


def test_a_condense_question_chat_engine_answers_through_the_latent_synthesizer(store, embedder, model):
    from llama_index.core.chat_engine import CondenseQuestionChatEngine
    from llama_index.core.llms import MockLLM

    engine = LatentQueryEngine.from_args(retriever=LatentRetriever(store, embedder, similarity_top_k=2), model=model, max_new_tokens=6)
    chat = CondenseQuestionChatEngine.from_defaults(query_engine=engine, llm=MockLLM())  # first turn: nothing to condense
    reply = chat.chat(QUESTION)
    direct = engine.query(QUESTION)
    assert reply.response == direct.response and reply.source_nodes
    assert [n.node.node_id for n in reply.source_nodes] == [n.node.node_id for n in direct.source_nodes]


def test_a_postprocessor_whose_latents_nobody_reads_warns_once(store, embedder, model):
    import warnings

    from lclm_rag.integrations.llama_index import LatentSynthesizer

    nodes = LatentRetriever(store, embedder, similarity_top_k=2).retrieve(QUESTION)
    post = LatentContextPostprocessor(model, store=store)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        post.postprocess_nodes(nodes)  # the first use cannot know yet
    with pytest.warns(UserWarning, match="no LatentSynthesizer reads these latents"):
        post.postprocess_nodes(nodes)  # its nodes of the first use were never read as latents
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        post.postprocess_nodes(nodes)  # once is enough
        read = LatentContextPostprocessor(model, store=store)
        given = read.postprocess_nodes(nodes)
        LatentSynthesizer(model, max_new_tokens=2).synthesize(QUESTION, given)
        read.postprocess_nodes(nodes)  # a synthesizer read them: no warning


def test_errors(store, embedder, model, tmp_path):
    engine = LatentQueryEngine.from_args(retriever=LatentRetriever(store, embedder, similarity_top_k=2), model=model)
    with pytest.raises(InputError, match="question is empty"):
        engine.query("   ")
    with pytest.raises(InputError, match="latency_budget_s must be > 0"):
        LatentQueryEngine.from_args(retriever=LatentRetriever(store, embedder, similarity_top_k=2), model=model, latency_budget_s=0)
    with pytest.raises(ConfigError, match="the skim policy needs a fitted probe"):  # at construction, not at the first query
        LatentQueryEngine.from_args(retriever=LatentRetriever(store, embedder, similarity_top_k=2), model=model, expand=1,
                                    expand_policy="skim")
    everything = LatentRetriever(store, embedder, similarity_top_k=500)  # more than the collection holds: all of it
    assert len(everything.retrieve("Eiffel")) == store.count()
    with pytest.raises(InputError, match="top_k must be a positive integer"):
        LatentRetriever(store, embedder, similarity_top_k=0)
    with pytest.raises(StoreError, match="'missing' does not exist"):
        LatentQueryEngine.from_collection("missing", path=str(tmp_path / "missing"), model=model)
    from lclm_rag.store import CollectionSpec, StoredPassage

    other = LatentStore.open("other", location=":memory:")
    other.bind(CollectionSpec(fingerprint="0" * 32, ratio=8, latent_dim=576, embedding_model=embedder.name, embedding_dim=384))
    other.upsert([StoredPassage("00000000-0000-0000-0000-000000000001", "x", {"doc_id": "d"}, embedder.embed(["x"])[0], torch.zeros(2, 576))])
    with pytest.raises(CompressorMismatchError, match="holds latents of compressor 0{32}, but the model's compressor is"):
        LatentQueryEngine.from_args(retriever=LatentRetriever(other, embedder, similarity_top_k=1), model=model)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["ingest_and_query.py", "postprocessor_with_llamaindex_qdrant.py", "llamaindex_pipeline_and_query_engine.py",
                                    "vector_store_index.py"])
def test_examples_run_offline(script, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, str(REPO / "examples" / script)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert ("A:" in res.stdout) and ("compressed" in res.stdout or "written" in res.stdout)


@pytest.mark.slow
def test_cli_query(store, model, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    model.save_pretrained(tmp_path / "checkpoint")  # the compressor the collection was built with
    path = store.backend.dir
    store.backend.close()  # the embedded engine allows one process at a time
    try:
        res = subprocess.run([sys.executable, "-m", "lclm_rag.cli", "query", QUESTION, "--collection", "docs", "--path", str(path),
                              "--checkpoint", str(tmp_path / "checkpoint"), "--top-k", "2", "--expand", "1", "--max-new-tokens", "8"],
                             capture_output=True, text=True, env=env, timeout=600)
    finally:
        store.backend.__init__(path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "answer:" in res.stdout and "[  text]" in res.stdout and "[latent]" in res.stdout


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["edge", "qdrant"])  # the embedded engine and qdrant-client's local mode
def test_ingestion_pipeline_and_vector_store_index_write_collections_the_latent_readers_read(tmp_path, packaged_model, backend):
    from lclm_rag.integrations.llama_index import LatentCompression, LatentSynthesizer, LatentVectorStore
    from llama_index.core import SimpleDirectoryReader, StorageContext, VectorStoreIndex
    from llama_index.core.ingestion import IngestionPipeline
    from llama_index.core.node_parser import SentenceSplitter
    from llama_index.core.query_engine import RetrieverQueryEngine
    from llama_index.core.storage.docstore import SimpleDocumentStore
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding

    from lclm_rag.hub import DEFAULT_EMBEDDER, resolve_model

    model = packaged_model
    embed_model = HuggingFaceEmbedding(model_name=resolve_model(DEFAULT_EMBEDDER))
    docs = SimpleDirectoryReader(str(DOCS), filename_as_id=True).load_data()

    # 1. IngestionPipeline -> a collection that LatentQueryEngine (what `lclm-rag query` runs) reads
    store = LatentStore.open("pipe", path=tmp_path / "pipe", backend=backend)
    pipeline = IngestionPipeline(transformations=[SentenceSplitter(chunk_size=128, chunk_overlap=16), embed_model,
                                                  LatentCompression(model)],
                                 vector_store=LatentVectorStore(store, model, DEFAULT_EMBEDDER),
                                 docstore=SimpleDocumentStore())
    written = pipeline.run(documents=docs)
    count = store.count()
    assert count == len(written) > len(docs) and store.spec.fingerprint == model.fingerprint()
    assert store.spec.latent_dtype == "uint8"  # a new collection's default; the re-run below keeps it
    assert pipeline.run(documents=docs) == [] and store.count() == count  # the docstore skips unchanged documents
    store.close()
    engine = LatentQueryEngine.from_collection("pipe", path=str(tmp_path / "pipe"), backend=backend, model=model, similarity_top_k=3,
                                               max_new_tokens=12)
    answer = engine.query(QUESTION)
    assert "Eiffel" in answer.response and [p["latent_source"] for p in answer.metadata["passages"]] == ["stored"] * 3
    engine.retriever.store.close()
    cli = subprocess.run([sys.executable, "-m", "lclm_rag.cli", "query", QUESTION, "--collection", "pipe", "--path", str(tmp_path / "pipe"),
                          "--backend", backend, "--top-k", "3", "--max-new-tokens", "12"], capture_output=True, text=True, timeout=600)
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert f"answer: {answer.response}\n" in cli.stdout  # `lclm-rag query` reads the pipeline's collection the same way

    # 2. VectorStoreIndex.from_documents -> the standard RetrieverQueryEngine with the latent synthesizer
    vector_store = LatentVectorStore(LatentStore.open("index", path=tmp_path / "index", backend=backend), model, DEFAULT_EMBEDDER)
    index = VectorStoreIndex.from_documents(docs, storage_context=StorageContext.from_defaults(vector_store=vector_store),
                                            embed_model=embed_model,
                                            transformations=[SentenceSplitter(chunk_size=128, chunk_overlap=16), LatentCompression(model)])
    standard = RetrieverQueryEngine(retriever=index.as_retriever(similarity_top_k=3),
                                    response_synthesizer=LatentSynthesizer(model, max_new_tokens=12))
    response = standard.query(QUESTION)
    assert response.response == answer.response  # the same passages, latents and decoder as the pipeline's collection
    assert [p["latent_source"] for p in response.metadata["passages"]] == ["stored"] * 3
    vector_store.client.close()
