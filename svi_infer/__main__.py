"""``python -m svi_infer``: generate a long video (Hydra app over ``conf/infer.yaml``).

Nothing heavy is imported before the config is composed and the inputs are checked, so ``--help``, ``--cfg job``
and a mistake are answered at once; a mistake in one line (``svi_infer: error: ...``) and exit status 2.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from svi_infer.errors import USER_ERRORS, exit_with, run_hydra_app
from svi_infer.longvideo.config import register

PROG = "svi_infer"


@hydra.main(version_base="1.3", config_path="pkg://conf", config_name="infer")
def main(cfg: DictConfig) -> None:
    from svi_infer.longvideo.plan import run  # after composition: --help and --cfg job never import the runtime

    try:
        result = run(cfg)
    except USER_ERRORS as err:
        exit_with(PROG, err)
    print(f"video:   {result.video} ({result.frames} frames, {result.clips} clips)")
    print(f"sidecar: {result.sidecar}")


def entry() -> None:
    """Compose and run; a config Hydra refuses (unknown key, wrong type, no such option) is reported in one line."""
    register()
    run_hydra_app(main, PROG, "conf/infer.yaml")


if __name__ == "__main__":
    entry()
