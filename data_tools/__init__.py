"""data_tools: from a folder of videos and captions to pre-encoded webdataset shards."""

import svi_infer  # noqa: F401  (first: installs its log filter before diffusers is imported)
