"""Length prediction for the `infinite` sampler; one module per `configs/predictor/<name>.yaml`.

    base.py          ProbeBatch (what a predictor is asked about), the LengthPredictor protocol
    oracle.py        true lengths from a same-seed pre-pass (ablations, upper bound)
    history.py       running length statistics of the same / similar / all prompts
    minilm.py        frozen MiniLM embedding of decoded prompt + probe -> MLP head
    hidden.py        the policy's own hidden state at the probe's last token -> MLP head
    head.py          the MLP head and its online learner (refit on a replay buffer)
    text_encoder.py  the shipped MiniLM encoder and its embedding cache
    metrics.py       predictor/* metrics (MAE, SMAPE, Kendall tau, within-10) and the scatter
    rollouts.py      saved-rollouts files and the offline training data (PredictorDataModule)
    module.py        PredictorModule: offline training of a head (`python train_predictor.py`)

    python train.py sampler=infinite predictor=hidden
    python train_predictor.py predictor=minilm rollouts=bench_results/rollouts_chat_train.pt
"""
from predictors.base import LengthPredictor, ProbeBatch, load_predictor, save_predictor
from predictors.hidden import HiddenPredictor
from predictors.history import HistoryPredictor
from predictors.minilm import MiniLMPredictor
from predictors.oracle import OraclePredictor

PREDICTORS = {cls.name: cls for cls in (OraclePredictor, HistoryPredictor, MiniLMPredictor,
                                        HiddenPredictor)}

__all__ = ["LengthPredictor", "ProbeBatch", "load_predictor", "save_predictor", "PREDICTORS",
           "OraclePredictor", "HistoryPredictor", "MiniLMPredictor", "HiddenPredictor"]
