"""``python -m svi_train +experiment=film``: train an error-recycling LoRA (Hydra over ``conf/train.yaml``).

Nothing heavy is imported before the config is composed and checked (:mod:`svi_train.plan`), so ``--help``,
``--cfg job``, a config mistake and a missing file are answered at once. A mistake is one line
(``svi_train: error: ...``) with exit status 2; a run stopped by non-finite losses exits with 1.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from svi_infer.errors import USER_ERRORS, exit_with, run_hydra_app
from svi_train.config import register
from svi_train.plan import plan

PROG = "svi_train"

register()


@hydra.main(version_base="1.3", config_path="pkg://conf", config_name="train")
def main(cfg: DictConfig) -> None:
    adapter = train_or_exit(cfg)
    print(f"adapter: {adapter}\nrun:     {cfg.output_dir}")


def train_or_exit(cfg: DictConfig) -> Path:
    """Check, then train; returns the final adapter. A mistake, found at start or mid-run (bad shards), exits with
    one line and status 2; a run stopped by non-finite losses with status 1 (its message names the last good
    checkpoint)."""
    try:
        checked = plan(cfg)
        from svi_train.run import train  # torch, Lightning: only once the config and the files are known good

        return train(checked)
    except USER_ERRORS as err:
        exit_with(PROG, err, 2)
    except FloatingPointError as err:
        exit_with(PROG, err, 1)


def entry() -> None:
    """Compose and train; a config Hydra refuses (unknown key, wrong type, no such option) is reported in one line."""
    run_hydra_app(main, PROG, "conf/train.yaml")


if __name__ == "__main__":
    entry()
