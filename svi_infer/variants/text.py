"""Text-only conditioning (Shot, Film, Tom & Jerry): the image and the prompt, nothing more."""

from __future__ import annotations

from svi_infer.variants.base import Conditioning


class TextConditioning(Conditioning):
    """The plain case: :class:`~svi_infer.variants.base.Conditioning` as it is."""
