"""What every entry point (train.py, locate_values.py, train_predictor.py) shares: the config
groups it instantiates, and how a run reports a user's error (one `error:` line naming the
config node, the traceback only in the run's log).
"""
from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import hydra
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("run")


class NotFileOnly(logging.Filter):
    """The console handler's filter (configs/hydra/default.yaml): it drops records marked
    `file_only`, such as a user error's traceback, which the run's log file keeps."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "file_only", False)


class LightningNoise(logging.Filter):
    """Lightning's lines that are not about this run: advertisements for its cloud products
    and notes on settings our configs choose on purpose (a GPU user still sees
    "GPU available: ...", and every warning)."""
    DROPPED = ("💡 Tip:", "TPU available:", "HPU available:",
               "`Trainer(limit_val_batches=1)` was configured")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.DROPPED)


def quiet_third_parties() -> None:
    """Silence, at their source, what other libraries print on every run and a user cannot act
    on; our own warnings and every other library warning still show."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(LightningNoise())
    # torch deprecated LeafSpec; Lightning 2.6's own pytree copy still builds one per batch
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # "Loading weights: 100%" bars of from_pretrained


quiet_third_parties()

def override_key(override: str) -> str:
    """`+model.lr=1e-5` -> `model.lr`: the key a command-line override sets."""
    return override.split("=")[0].lstrip("+~")


# The keys a running multirun sweeps over (set when the sweep starts, bench/report.py).
SWEPT_KEYS: set[str] = set()


def swept_keys(hydra_cfg: Any) -> set[str]:
    """The override keys a multirun varies: from the command line (`key=a,b`, ranges, globs)
    and from `hydra.sweeper.params` (experiment configs that carry their sweep)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    parser = OverridesParser.create()
    keys = {o.get_key_element() for o in parser.parse_overrides(list(hydra_cfg.overrides.task))
            if o.is_sweep_override()}
    params = OmegaConf.select(hydra_cfg, "sweeper.params", default=None) or {}
    return keys | set(params)


def run_name() -> str:
    """The `${run_name:}` resolver (configs/logger/tensorboard.yaml): in a multirun, the job's
    values of the swept keys ("sampler=micro,model.group_size=16"), so that TensorBoard on a
    sweep dir lists readable runs; "" in a single run (its folder already has its date)."""
    if not multirun():
        return ""
    from hydra.core.hydra_config import HydraConfig
    task = list(HydraConfig.get().overrides.task)
    chosen = [o for o in task if override_key(o) in SWEPT_KEYS] if SWEPT_KEYS \
        else task
    return re.sub(r"[/\\]", "_", ",".join(chosen))[:150]


if not OmegaConf.has_resolver("run_name"):
    OmegaConf.register_new_resolver("run_name", run_name)

# Errors that come from the user's config or data: printed as one clear line, no traceback.
USER_ERRORS = (ValueError, ImportError, FileNotFoundError)


def instantiate_group(cfg: DictConfig | None) -> list[Any]:
    """Callbacks or loggers: every entry of the group that has a _target_."""
    if not cfg:
        return []
    return [hydra.utils.instantiate(node) for node in cfg.values()
            if isinstance(node, DictConfig) and "_target_" in node]


def config_key(err: BaseException | None) -> str | None:
    """The config node Hydra was instantiating when `err` was raised (its `full_key`)."""
    while err is not None:
        found = re.search(r"full_key: ([\w.\[\]]+)", str(err))
        if found:
            return found.group(1)
        err = err.__cause__ or err.__context__
    return None


def user_error(err: BaseException) -> BaseException | None:
    """The config/data error at the root of `err`, if there is one (Hydra wraps them)."""
    while err is not None:
        if isinstance(err, USER_ERRORS):
            return err
        err = err.__cause__ or err.__context__
    return None


def qualify(message: str, key: str | None, cfg: DictConfig | None) -> str:
    """Name the setting in full: a message that starts with a field of the config node `key`
    ("group_size must be ...", raised while Hydra built `model`) gets the node's prefix."""
    found = re.match(r"([A-Za-z_]\w*)\b", message)
    if not (key and found and cfg is not None) or message.startswith(f"{key}."):
        return message
    node = OmegaConf.select(cfg, key, default=None)
    if isinstance(node, DictConfig) and found.group(1) in node:
        return f"{key}.{message}"
    return message


def error_line(err: BaseException, cause: BaseException, cfg: DictConfig | None) -> str:
    """The one line a user error prints: what is wrong with which setting or file."""
    text = " ".join(line.strip() for line in str(cause).strip().splitlines() if line.strip())
    if isinstance(cause, ImportError) and not text.startswith(("No module", "cannot")):
        text = f"{type(cause).__name__}: {text}"
    text = text or type(cause).__name__
    key = config_key(err)
    text = qualify(text, key, cfg)
    if key and key not in text:
        text += f" (in the config `{key}`)"
    return f"error: {text}"


GROUPS_SHOWN = ("policy", "sampler", "data", "instruments", "locate/select", "predictor")


def what_runs(cfg: DictConfig) -> str:
    """One line for the terminal: the task, its main config choices, the overrides and the
    run dir (the whole config goes to the log file and config_tree.yaml)."""
    from hydra.core.hydra_config import HydraConfig
    parts = [str(cfg.get("task_name", "run"))]
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        choices = hydra_cfg.runtime.choices
        parts += [f"{g}={choices[g]}" for g in GROUPS_SHOWN if choices.get(g)]
        parts += [o for o in hydra_cfg.overrides.task
                  if override_key(o) not in GROUPS_SHOWN]
    return " ".join(parts) + f" -> {cfg.paths.output_dir}"


def multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_reporting_errors(run: Callable[[DictConfig], tuple], cfg: DictConfig) -> tuple | None:
    """Save the config tree, then run. A bad-input error prints one `error:` line naming the
    setting or file (the traceback goes to the run's log file only) and exits 1; in a Hydra
    multirun it returns None instead, so that the sweep goes on with the next job. The line
    is also written to `<output_dir>/error.txt`, for the sweep's report. Anything else (a
    bug) is re-raised with its traceback."""
    output_dir = Path(cfg.paths.output_dir)
    text = OmegaConf.to_yaml(cfg, resolve=True)
    log.info("config:\n%s", text, extra={"file_only": True})
    try:  # paths.output_dir may be set to a folder Hydra did not make
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config_tree.yaml").write_text(text)
    except OSError as err:
        print(f"\nerror: paths.output_dir={str(output_dir)!r} cannot be written: "
              f"{err.strerror or err}", file=sys.stderr, flush=True)
        if multirun():
            return None
        raise SystemExit(1) from None
    log.info(what_runs(cfg))
    try:
        return run(cfg)
    except Exception as err:  # noqa: BLE001 - reported below, then re-raised or exited
        cause = user_error(err)
        log.error("run failed; output dir: %s", output_dir, exc_info=True,
                  extra={"file_only": cause is not None})
        line = error_line(err, cause, cfg) if cause is not None else \
            f"error: {type(err).__name__}: {err} (a bug: the traceback is above)"
        (output_dir / "error.txt").write_text(line + "\n")
        if cause is None:
            if multirun():  # the traceback is above; the sweep goes on, its report says it
                return None
            raise
        logs = sorted(output_dir.glob("*.log"))
        if os.environ.get("LOCAL_RANK", "0") == "0":  # one line, not one per DDP/FSDP rank
            print(f"\n{line} (log: {logs[0] if logs else output_dir})", file=sys.stderr,
                  flush=True)
        if multirun():
            return None
        raise SystemExit(1) from None


def run_and_report(run: Callable[[DictConfig], tuple], cfg: DictConfig,
                   report: Callable[..., float | None]) -> float | None:
    """An entry point's `main`: `run(cfg)` with its errors reported (`run_reporting_errors`),
    then `report(cfg, metrics, objects)` of what it made, whose value goes back to Hydra (the
    sweeper's objective); None for a multirun job's user error (the sweep goes on)."""
    result = run_reporting_errors(run, cfg)
    return None if result is None else report(cfg, *result)


def trainer_metrics(trainer: Any) -> dict[str, float]:
    """The scalar metrics a Lightning trainer ended with."""
    return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}


def metric_summary(metrics: dict[str, float], prefixes: tuple[str, ...]) -> str:
    """`name=value, ...` of the metrics whose names start with one of `prefixes`."""
    return ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()) if k.startswith(prefixes))
