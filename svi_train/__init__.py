"""svi_train: the error-recycling LoRA trainer (Lightning + webdataset + Hydra)."""

import svi_infer  # noqa: F401  (first: installs its log filter before diffusers is imported)
