"""``python -m svi_infer``: generate a long video (Hydra app over ``conf/infer.yaml``)."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from svi_infer.app import USER_ERRORS, run


@hydra.main(version_base="1.3", config_path="pkg://conf", config_name="infer")
def main(cfg: DictConfig) -> None:
    try:
        result = run(cfg)
    except USER_ERRORS as err:
        print(f"svi_infer: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"video:   {result.video} ({result.frames} frames, {result.clips} clips)")
    print(f"sidecar: {result.sidecar}")


if __name__ == "__main__":
    main()
