"""Kandinsky20TextStage: prompts -> Kandinsky 2.0's U-Net conditioning, with the original's `encode_text` and
text head: the prompt through both encoders (M-CLIP, an XLM-RoBERTa-large with a linear map of its masked
mean; the mT5-small encoder), each tokenized to 77 tokens with padding, then the text head
(families/kandinsky20/text_head.py) -> cross-attention context (154, D) and pooled embedding (E,).
Its own stage (config section `text_encoder`); its parameters and memory: the README's table (Real weights)."""

from __future__ import annotations

import numpy as np

from ..config import JobConfig
from ..device import stage_device
from ..inputs import pack
from ..models import load_asset, load_module, model_dir
from ..rows import check_columns, failed, is_null

REQUIRED = ("id", "prompt", "negative_prompt", "guidance_scale")
MAX_LENGTH = 77  # the original's `max_length=77`, for both tokenizers


class Kandinsky20TextStage:
    """Adds, per row, `prompt_embeds` (packed float32 (154, D)) and `prompt_pooled` ((E,)), and for rows that
    guide (guidance_scale > 1) `negative_prompt_embeds` and `negative_pooled`: the unconditional text, which is
    the row's negative prompt, or "" without one (the original always uses ""; "" is encoded once per actor).
    No attention mask leaves this stage: the original's U-Net attends to all 154 positions, padding included.
    Rows failed upstream pass through."""

    def __init__(self, config: JobConfig, sources: dict | None = None):
        import torch
        from diffusers.pipelines.kandinsky.text_encoder import MultilingualCLIP
        from transformers import AutoTokenizer, MT5EncoderModel

        from ..families.kandinsky20.text_head import Kandinsky20TextHead

        torch.set_num_threads(config.text_encoder.threads())
        model, folder = config.model, model_dir(config, "decoder", sources)
        self.device = stage_device(model, config.text_encoder)
        load = lambda cls, sub: load_module(cls, model, folder, sub, self.device)  # noqa: E731
        self.tokenizers = [load_asset(AutoTokenizer, folder, sub) for sub in ("tokenizer", "tokenizer_2")]
        self.encoder1, self.encoder2 = load(MultilingualCLIP, "text_encoder"), load(MT5EncoderModel, "text_encoder_2")
        self.head = load(Kandinsky20TextHead, "text_head")
        with torch.inference_mode():
            self.empty = self._encode([""])  # ((1, 154, D), (1, E)) float32 numpy: the negative of most rows

    def _tokens(self, tokenizer, texts: list[str]):
        t = tokenizer(texts, max_length=MAX_LENGTH, padding="max_length", truncation=True, return_attention_mask=True,
                      add_special_tokens=True, return_tensors="pt")
        return t["input_ids"].to(self.device), t["attention_mask"].to(self.device)

    def _encode(self, texts: list[str]):
        """-> (context (M, 154, D), pooled (M, E)) as float32 numpy."""
        import torch

        with torch.inference_mode():
            ids, mask = self._tokens(self.tokenizers[0], texts)
            pooled1, full1 = self.encoder1(input_ids=ids, attention_mask=mask)  # (M, 640), (M, 77, 1024)
            ids, mask = self._tokens(self.tokenizers[1], texts)
            full2 = self.encoder2(input_ids=ids, attention_mask=mask)["last_hidden_state"]  # (M, 77, 512)
            dtype = self.head.dtype
            context, pooled = self.head(full1.to(dtype), pooled1.to(dtype), full2.to(dtype))
        return context.float().cpu().numpy(), pooled.float().cpu().numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_columns(batch, REQUIRED, "Kandinsky20TextStage")
        n = len(batch["id"])
        ok = np.flatnonzero(~failed(batch))
        guided = [i for i in ok if batch["guidance_scale"][i] > 1]
        negatives = {i: "" if is_null(batch["negative_prompt"][i]) else str(batch["negative_prompt"][i]) for i in guided}
        others = [i for i in guided if negatives[i] != ""]
        texts = [str(batch["prompt"][i]) for i in ok] + [negatives[i] for i in others]
        context, pooled = self._encode(texts) if texts else (None, None)
        columns = {name: np.full(n, None, dtype=object) for name in
                   ("prompt_embeds", "prompt_pooled", "negative_prompt_embeds", "negative_pooled")}
        for j, i in enumerate(ok):
            columns["prompt_embeds"][i], columns["prompt_pooled"][i] = pack(context[j]), pack(pooled[j])
        row_of = {i: len(ok) + j for j, i in enumerate(others)}
        for i in guided:
            c, p = (self.empty[0][0], self.empty[1][0]) if i not in row_of else (context[row_of[i]], pooled[row_of[i]])
            columns["negative_prompt_embeds"][i], columns["negative_pooled"][i] = pack(c), pack(p)
        return {**batch, **columns}
