"""``python -m svi_train +experiment=film``: train an error-recycling LoRA (Hydra over ``conf/train.yaml``)."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from svi_train.config import register

register()


@hydra.main(version_base="1.3", config_path="pkg://conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from svi_infer.app import USER_ERRORS  # after composition: `--cfg job` needs no torch start-up
    from svi_train.run import run

    try:
        adapter = run(cfg)
    except USER_ERRORS as err:
        print(f"svi_train: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"adapter: {adapter}\nrun:     {cfg.output_dir}")


if __name__ == "__main__":
    main()
