"""svi_infer: the shared runtime (model specs, Wan components, flow math, conditioning, adapters) and the
long-video generator."""

import logging


class _QuietTorchvisionFallback(logging.Filter):
    """diffusers imports ``CLIPImageProcessor``; on CPU installs (no torchvision) transformers then warns that
    it falls back to the PIL processor, which is the one this project uses anyway."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_QuietTorchvisionFallback())


class _QuietBitsandbytes4bit(logging.Filter):
    """bitsandbytes (imported by peft) warns on AVX-512-bf16 CPUs that a 4-bit matmul kernel package is missing; this
    project uses its 8-bit AdamW only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "gemm_4bit_forward" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_QuietBitsandbytes4bit())
