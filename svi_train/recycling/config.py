"""The knobs of Error-Recycling Fine-Tuning and their torch storage dtypes.

The schema itself, :class:`RecyclingConfig`, lives with the other config schemas in :mod:`svi_train.config`, which
is torch-free so that the CLI answers ``--help`` or a config mistake before torch loads; this module adds what
only the banks need.
"""

from __future__ import annotations

import torch

from svi_train.config import REPLACEMENT_POLICIES, STORAGE_DTYPE_NAMES, RecyclingConfig

STORAGE_DTYPES = {name: getattr(torch, name) for name in STORAGE_DTYPE_NAMES}

__all__ = ["REPLACEMENT_POLICIES", "STORAGE_DTYPES", "RecyclingConfig"]
