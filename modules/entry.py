"""What every entry point (train.py, locate_values.py, train_predictor.py) shares: the config
groups it instantiates, and how a run reports a user's error (one `error:` line naming the
config node, the traceback only in the run's log).
"""
from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Any, Callable

import hydra
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("train")


class NotFileOnly(logging.Filter):
    """The console handler's filter (configs/hydra/default.yaml): it drops records marked
    `file_only`, such as a user error's traceback, which the run's log file keeps."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "file_only", False)

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


def run_reporting_errors(run: Callable[[DictConfig], tuple], cfg: DictConfig) -> tuple:
    """Save the config tree, then run; a bad-input error becomes one `error:` line and exit 1
    (the traceback goes to the run's log), anything else is re-raised."""
    output_dir = Path(cfg.paths.output_dir)
    text = OmegaConf.to_yaml(cfg, resolve=True)
    log.info("config:\n%s", text)
    (output_dir / "config_tree.yaml").write_text(text)
    try:
        return run(cfg)
    except Exception as err:  # noqa: BLE001 - reported below, then re-raised or exited
        cause = user_error(err)
        log.error("run failed; output dir: %s", output_dir, exc_info=True,
                  extra={"file_only": cause is not None})
        if cause is None:
            raise
        key = config_key(err)
        where = f"in the config `{key}`; " if key else ""
        print(f"\nerror: {type(cause).__name__}: {cause}\n({where}details: {output_dir})",
              file=sys.stderr)
        raise SystemExit(1) from None
