"""Restoration probe: does a decoder learn to *read* latents? Small, fast, always with its control.

Used for the rows of docs/architecture_search.md that are not full `lclm-rag train` runs:

    python scripts/restoration_probe.py oracle                       # no training: upper bounds
    python scripts/restoration_probe.py train --prompt plain --batch 2 --steps 400 --every 50
    python scripts/restoration_probe.py train --ratio 1 --steps 100   # per-token latents
    python scripts/restoration_probe.py train --align 300 --steps 200 # projector warm start first
    python scripts/restoration_probe.py train --prompt plain --batch 4 --align 300 --curriculum 1:50,2:200,4:300

Metric: teacher-forced token accuracy of rebuilding 32 held-out 64-token wiki chunks from their
latents, and the control (each chunk given another chunk's latents). Only the gap is reading.
``--prompt chat`` is the trainer's prompt (chat template, instruction); ``plain`` is
[boundary, latents, boundary] followed directly by the passage. ``--align N`` first regresses the
projector for N steps onto the mean input embedding of each latent's token group.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from torch import nn

from lclm_rag.chunking import chunk_text
from lclm_rag.config import LatentConfig
from lclm_rag.model import LatentContextModel
from lclm_rag.train import (alignment_targets, part_parameters, restoration_example, set_trainable, teacher_forced_batch,
                             teacher_forced_loss)

CORPUS = Path(__file__).resolve().parent.parent.parent / "shared/data/corpus/wiki_summaries.jsonl"
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def plain_batch(model: LatentContextModel, texts: list[str], slots: list[torch.Tensor]):
    """Loss, correct, total for [boundary, projected latents, boundary] + passage, no template."""
    dec = model.decoder
    prompts = [torch.cat([dec.boundary[0:1], dec.projector(latents), dec.boundary[1:2]]) for latents in slots]
    return teacher_forced_loss(dec, prompts, texts)


def group_embedding_targets(model: LatentContextModel, texts: list[str], ratio: int) -> list[torch.Tensor]:
    """Mean decoder input embedding of each group of ``ratio`` tokens (what alignment regresses onto)."""
    return alignment_targets(model, model.compressor.tokenize(texts), ratio)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["oracle", "train"])
    p.add_argument("--prompt", choices=["chat", "plain"], default="chat")
    p.add_argument("--layers", type=int, default=2, help="encoder depth (first k layers)")
    p.add_argument("--ratio", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--every", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--align", type=int, default=0, help="projector warm-up steps (16 passages each) before training")
    p.add_argument("--curriculum", help="ratio:steps,... e.g. 1:100,2:200,4:300 (overrides --ratio/--steps; "
                                        "--align then aligns at the first ratio)")
    p.add_argument("--decoder-lr", type=float, help="decoder LoRA lr (default: --lr)")
    args = p.parse_args()
    schedule = [tuple(int(x) for x in item.split(":")) for item in args.curriculum.split(",")] if args.curriculum \
        else [(args.ratio, args.steps)]
    args.ratio = schedule[0][0]

    torch.manual_seed(0)
    model = LatentContextModel.from_config(LatentConfig(
        encoder="HuggingFaceTB/SmolLM2-135M-Instruct", decoder="HuggingFaceTB/SmolLM2-135M-Instruct",
        encoder_layers=args.layers, ratio=args.ratio, decoder_lora=LORA))
    tok = model.compressor.tokenizer
    docs = [json.loads(line)["text"] for line in CORPUS.open()]
    random.Random(0).shuffle(docs)
    held_out = [c.text for d in docs[:20] for c in chunk_text(d, tok, 64)][:32]
    train = [c.text for d in docs[20:3000] for c in chunk_text(d, tok, 64)]
    model.decoder.projector.calibrate(torch.cat(model.compressor.compress(random.Random(1).sample(train, 256))))

    def run(texts, slots):
        if args.prompt == "plain":
            return plain_batch(model, texts, slots)
        return teacher_forced_batch(model, [restoration_example(t) for t in texts], slots)

    @torch.no_grad()
    def evaluate(slots=None) -> tuple[float, float]:
        model.eval()
        slots = slots if slots is not None else model.compressor.compress(held_out)
        _, c, t = run(held_out, slots)
        _, c2, t2 = run(held_out, slots[1:] + slots[:1])
        model.train()
        return round(c / t, 4), round(c2 / t2, 4)

    if args.what == "oracle":  # no training: raw text, and mean token embeddings in place of projected latents
        model.eval()
        model.decoder.projector.forward = lambda latents: latents  # slots below are already decoder embeddings
        print("text in the slot:", evaluate(list(held_out)))
        for r in (1, 2, 4, 8):
            print(f"mean token embeddings, 1 per {r}:", evaluate(group_embedding_targets(model, held_out, r)))
        return

    if args.align:
        optimizer = torch.optim.AdamW(model.decoder.projector.parameters(), lr=1e-3, weight_decay=0.0)
        rng = random.Random(5)
        for step in range(1, args.align + 1):
            texts = rng.sample(train, 16)
            with torch.no_grad():
                latents = model.compressor.encode_ids(model.compressor.tokenize(texts))
            pred, target = model.decoder.projector(torch.cat(latents)), torch.cat(group_embedding_targets(model, texts, args.ratio))
            loss = nn.functional.mse_loss(pred, target)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if step % 50 == 0:
                print(f"align {step}: mse {loss.item():.5f}, cosine {nn.functional.cosine_similarity(pred, target).mean().item():.3f}", flush=True)
        print("after alignment:", evaluate(), flush=True)

    set_trainable(model, ["projector", "boundary", "decoder_lora"])
    lora = part_parameters(model, "decoder_lora")
    params = [p for p in model.parameters() if p.requires_grad]
    rest = [p for p in params if all(p is not q for q in lora)]
    optimizer = torch.optim.AdamW([{"params": rest, "lr": args.lr}, {"params": lora, "lr": args.decoder_lr or args.lr}],
                                  weight_decay=0.0)
    rng, start, done = random.Random(2), time.time(), 0
    for ratio, steps in schedule:
        model.compressor.config.ratio = model.config.ratio = ratio
        print(f"{args.prompt} prompt, {args.layers}-layer encoder, 1:{ratio}, batch {args.batch}, lr {args.lr}/"
              f"{args.decoder_lr or args.lr}; start:", evaluate(), flush=True)
        for step in range(1, steps + 1):
            texts = rng.sample(train, args.batch)
            with torch.no_grad():
                latents = model.compressor.encode_ids(model.compressor.tokenize(texts))
            loss, _, _ = run(texts, latents)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad()
            done += args.batch
            if step % args.every == 0:
                print(f"1:{ratio} step {step} ({done} samples, {time.time() - start:.0f} s): own latents / control",
                      evaluate(), flush=True)


if __name__ == "__main__":
    main()
