"""What a training step minimises: teacher-forced loss on targets after latent prompts, or, in the
alignment stage, the projector's distance to the decoder's own embeddings of each latent's tokens."""

from __future__ import annotations

import torch
from torch import nn

from lclm_rag.errors import ConfigError
from lclm_rag.model import LatentContextModel
from lclm_rag.training.examples import Example


def teacher_forced_batch(model: LatentContextModel, examples: list[Example], latents: list[torch.Tensor], per_token: bool = False):
    """Loss (mean over examples of the per-token loss on the target), correct and total target tokens.

    ``latents`` holds the examples' passages in order, ``len(ex.passages)`` per example.
    """
    slots, cursor = [], 0
    for ex in examples:
        slots.append(latents[cursor : cursor + len(ex.passages)])
        cursor += len(ex.passages)
    return model.teacher_forced([ex.user_message for ex in examples], slots, [ex.target for ex in examples], per_token)


def alignment_targets(model: LatentContextModel, token_ids: list[list[int]], ratio: int | None = None) -> list[torch.Tensor]:
    """The decoder's mean input embedding of each latent's group of ``ratio`` tokens (default: the model's).

    Windows hold whole groups (``encoder_window`` is a multiple of the ratio), so the groups are
    consecutive runs of ``ratio`` ids. Needs encoder and decoder to share a tokenizer.
    """
    table = model.decoder.model.get_input_embeddings().weight.detach()
    r = ratio or model.config.ratio
    out = []
    for ids in token_ids:
        emb = table[torch.tensor(ids, device=table.device)]
        out.append(torch.stack([emb[i : i + r].mean(0) for i in range(0, len(ids), r)]))
    return out


def check_shared_tokenizer(model: LatentContextModel) -> None:
    if model.compressor.tokenizer.get_vocab() != model.decoder.tokenizer.get_vocab():
        raise ConfigError("the alignment stage needs the encoder and decoder to share a tokenizer "
                          f"({model.config.encoder} and {model.config.decoder} do not); start at restoration instead")


class TrainingModule(nn.Module):
    """Wraps the model so DDP sees one forward: examples -> (loss, metric name, metric value)."""

    def __init__(self, model: LatentContextModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, examples: list[Example], encoder_trainable: bool, alignment: bool = False):
        compressor = self.model.compressor
        ids = compressor.tokenize([p for ex in examples for p in ex.passages])
        with torch.set_grad_enabled(encoder_trainable and torch.is_grad_enabled()):
            latents = compressor.encode_ids(ids)
        if alignment:
            dec = self.model.decoder
            predicted = dec.projector(torch.cat(latents).to(dec.projector.fc1.weight.dtype))
            target = torch.cat(alignment_targets(self.model, ids)).to(predicted.dtype)
            cosine = nn.functional.cosine_similarity(predicted.detach(), target).mean().item()
            return nn.functional.mse_loss(predicted, target), "cosine", cosine
        loss, correct, total = teacher_forced_batch(self.model, examples, latents)
        return loss, "token_acc", correct / max(total, 1)
