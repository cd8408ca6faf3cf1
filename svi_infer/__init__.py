"""svi_infer: the shared runtime (model specs, Wan components, flow math, conditioning, adapters) and the
long-video generator."""

import logging


class _QuietTorchvisionFallback(logging.Filter):
    """diffusers imports ``CLIPImageProcessor``; on CPU installs (no torchvision) transformers then warns that
    it falls back to the PIL processor, which is the one this project uses anyway."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_QuietTorchvisionFallback())
