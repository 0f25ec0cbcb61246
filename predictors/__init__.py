"""Length prediction for the `infinite` sampler; one module per `configs/predictor/<name>.yaml`.

    base.py          saving and loading a predictor; the learned predictors' predict/observe
                     (the contract, LengthPredictor and ProbeBatch: samplers/prediction.py)
    oracle.py        true lengths from a same-seed pre-pass (ablations, upper bound)
    history.py       running length statistics of the same / similar / all prompts
    minilm.py        frozen MiniLM embedding of decoded prompt + probe -> MLP head
    hidden.py        the policy's own hidden state at the probe's last token -> MLP head
                     (both: a featurizer and a HeadLearner composed in a LearnedPredictor)
    head.py          the MLP head and its online learner (refit on a replay buffer)
    text_encoder.py  the shipped MiniLM encoder and its embedding cache
    metrics.py       predictor/* metrics (MAE, SMAPE, Kendall tau, within-10) and the scatter
    rollouts.py      saved-rollouts files and the offline training data (PredictorDataModule)
    module.py        PredictorModule: offline training of a head (`python train_predictor.py`)

    python train.py sampler=infinite predictor=hidden
    python train_predictor.py predictor=minilm rollouts=bench_results/rollouts_chat_train.pt
"""
from predictors.base import load_predictor, save_predictor
from predictors.hidden import hidden_predictor
from predictors.history import HistoryPredictor
from predictors.minilm import minilm_predictor
from predictors.oracle import OraclePredictor

# name -> what builds it (the `predictor` config group's _target_)
PREDICTORS = {"oracle": OraclePredictor, "history": HistoryPredictor,
              "minilm": minilm_predictor, "hidden": hidden_predictor}

__all__ = ["load_predictor", "save_predictor", "PREDICTORS",
           "OraclePredictor", "HistoryPredictor", "minilm_predictor", "hidden_predictor"]
