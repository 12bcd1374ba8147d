"""T5EncoderStage: prompts -> T5 embeddings cut to each row's own length, with `Kandinsky3Pipeline`'s
`encode_prompt` semantics. Its own stage (config section `text_encoder`): on the real model the T5
encoder (flan-UL2's) has 8.7B parameters, about 17 GB in bf16, so it is scheduled apart from the U-Net."""

from __future__ import annotations

import numpy as np

from ..config import JobConfig
from ..device import stage_device
from ..inputs import pack
from ..models import load_asset, load_module, model_dir
from ..rows import check_columns, failed, is_null

REQUIRED = ("id", "prompt", "negative_prompt", "guidance_scale")
MAX_LENGTH = 128  # Kandinsky3Pipeline.encode_prompt's `max_length`, for prompts and negative prompts alike


class T5EncoderStage:
    """Adds, per row, `prompt_embeds` (packed float32 (L, D)), `context_length` (L), `prompt_tokens` and,
    for rows that guide, `negative_prompt_embeds` ((L, D), or None) and `negative_prompt_tokens`.

    diffusers tokenizes to 128 tokens, encodes, and cuts the batch to its longest prompt + 1 token
    (`process_embeds`: `attention_mask.sum(-1).max() + 1`), zeroing the padding. Here every row is cut
    to its own length L = its tokens + 1 (at most 128), exactly as a one-prompt call cuts it: the U-Net
    pools the context with an unmasked mean over L, so a batch-wide L would make a row's image depend
    on its batch-mates (the U-Net stage pads rows to a common length and pools each over its own L
    instead). Within L, the first `prompt_tokens`
    positions are attended to and the rest are zeros.

    The negative prompt is cut to the positive's L, as diffusers does. A null negative prompt gives
    zero embeddings and an all-zero mask (`negative_prompt_tokens` 0) without a T5 call; an empty
    string is encoded like any prompt (the pipeline's `negative_prompt=""`). Rows that do not guide
    (guidance_scale <= 1) encode no negative. Rows failed upstream pass through.
    """

    def __init__(self, config: JobConfig, sources: dict | None = None):
        import torch
        from transformers import T5EncoderModel, T5Tokenizer

        torch.set_num_threads(config.text_encoder.threads())
        folder = model_dir(config, "decoder", sources)
        self.device = stage_device(config.model, config.text_encoder)
        self.tokenizer = load_asset(T5Tokenizer, folder, "tokenizer")
        self.encoder = load_module(T5EncoderModel, config.model, folder, "text_encoder", self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_columns(batch, REQUIRED, "T5EncoderStage")
        n = len(batch["id"])
        ok = np.flatnonzero(~failed(batch))
        guided = [i for i in ok if batch["guidance_scale"][i] > 1 and not is_null(batch["negative_prompt"][i])]
        texts = [str(batch["prompt"][i]) for i in ok] + [str(batch["negative_prompt"][i]) for i in guided]
        hidden, tokens = self._encode(texts) if texts else (None, None)  # (M, 128, D), (M,)
        embeds, lengths, counts = np.full(n, None, dtype=object), np.zeros(n, np.int64), np.zeros(n, np.int64)
        negative, negative_counts = np.full(n, None, dtype=object), np.zeros(n, np.int64)
        for j, i in enumerate(ok):
            counts[i] = tokens[j]
            lengths[i] = min(tokens[j] + 1, MAX_LENGTH)
            embeds[i] = pack(hidden[j, : lengths[i]])
        for j, i in enumerate(guided, start=len(ok)):
            negative_counts[i] = min(tokens[j], lengths[i])
            negative[i] = pack(hidden[j, : lengths[i]])
        out = dict(batch)
        out.update(prompt_embeds=embeds, context_length=lengths, prompt_tokens=counts,
                   negative_prompt_embeds=negative, negative_prompt_tokens=negative_counts)
        return out

    def _encode(self, texts: list[str]):
        """-> (float32 (M, 128, D) embeddings with the padding zeroed, tokens per text (M,))."""
        import torch

        inputs = self.tokenizer(texts, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                                return_tensors="pt")
        mask = inputs.attention_mask.to(self.device)  # (M, 128): ones, then zeros (right padding)
        with torch.inference_mode():
            hidden = self.encoder(inputs.input_ids.to(self.device), attention_mask=mask)[0]  # (M, 128, D)
            hidden = hidden * mask.unsqueeze(2).to(hidden.dtype)  # diffusers: embeddings * mask
        return hidden.float().cpu().numpy(), inputs.attention_mask.sum(-1).numpy()
