"""``python -m svi_infer.evaluate``: the drift-evaluation command line (:mod:`svi_infer.evaluate.cli`)."""

from svi_infer.evaluate.cli import main

if __name__ == "__main__":
    main()
