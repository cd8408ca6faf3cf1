"""``python -m data_tools <command> key=value ...`` (Hydra over ``conf/data_tools.yaml``).

Only Hydra and the torch-free schema load before the config is composed: ``--help``, ``--cfg job`` and config
errors answer at once; torch and the model load only once a command needs them.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from data_tools.config import COMMANDS  # (importing it registers the schema conf/data_tools.yaml extends)
from svi_infer.errors import USER_ERRORS, exit_with, run_hydra_app


@hydra.main(version_base="1.3", config_path="pkg://conf", config_name="data_tools")
def main(cfg: DictConfig) -> None:
    from data_tools.app import DataRunError, run

    try:
        run(cfg)
    except DataRunError as err:  # the run finished, but its result needs the user's attention
        exit_with("data_tools", err, 1)
    except USER_ERRORS as err:
        exit_with("data_tools", err, 2)


def entry() -> None:
    """Turn a leading ``prepare`` / ``scan`` / ... into the ``command=`` override Hydra understands."""
    if len(sys.argv) > 1 and sys.argv[1] in COMMANDS:
        sys.argv[1] = f"command={sys.argv[1]}"
    run_hydra_app(main, "data_tools", "conf/data_tools.yaml")


if __name__ == "__main__":
    entry()
