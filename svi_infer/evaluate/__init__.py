"""Drift evaluation of long videos (``python -m svi_infer.evaluate``), one module per concern.

:mod:`~svi_infer.evaluate.metrics` measures frames cut into clips, :mod:`~svi_infer.evaluate.reading` checks and
decodes a video with its sidecar, :mod:`~svi_infer.evaluate.report` and :mod:`~svi_infer.evaluate.plots` write the
report, :mod:`~svi_infer.evaluate.cli` is the command line and :mod:`~svi_infer.evaluate.world` scores toy-world
rollouts against their ground truth. Nothing is imported here, so ``--help`` stays fast.
"""
