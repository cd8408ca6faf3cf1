"""``python -m data_tools <command> key=value ...`` (Hydra over ``conf/data.yaml``)."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from data_tools.app import COMMANDS, DataRunError, run
from svi_infer.app import USER_ERRORS


@hydra.main(version_base="1.3", config_path="pkg://conf", config_name="data")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except (*USER_ERRORS, DataRunError) as err:
        print(f"data_tools: error: {err}", file=sys.stderr)
        sys.exit(1 if isinstance(err, DataRunError) else 2)


def entry() -> None:
    """Turn a leading ``prepare`` / ``scan`` / ... into the ``command=`` override Hydra understands."""
    if len(sys.argv) > 1 and sys.argv[1] in COMMANDS:
        sys.argv[1] = f"command={sys.argv[1]}"
    main()


if __name__ == "__main__":
    entry()
