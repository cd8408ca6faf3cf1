"""What a variant is, and the strategy objects that make one.

A variant (Shot, Film, Talk, Dance, Pro, ...) is two choices: its :class:`~svi_infer.variants.base.Conditioning`
(``text``, ``audio`` for Talk, ``pose`` for Dance) and its :class:`~svi_infer.variants.base.Handoff` (``pixel``:
decoded frames re-encoded; ``latent``: SVI 2.0 Pro's latents). The data tools, training and generation call those
objects and never branch on the names: :func:`make_conditioning` and :func:`make_handoff` are the only places that
do. A new variant is one strategy module, one config and its tests (docs/architecture.md).

:class:`VariantSpec` is the contract that travels with the data: ``data_tools`` writes it into ``index.json``,
``svi_train`` reads it from the shards, refuses a training config that contradicts it and writes what it trained
into ``svi.json``, and ``svi_infer`` reads it from there. This module is torch-free, so every CLI checks it before
torch loads.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from svi_infer.variants.base import Conditioning, Handoff

CONDITIONINGS = ("text", "audio", "pose")  # Shot / Film / Tom & Jerry, Talk, Dance
HANDOFFS = ("pixel", "latent")  # how a clip is carried into the next: decoded frames, or latents
# keys renamed so that one concept has one name everywhere: old -> new (refused with the new name)
RENAMED_KEYS = {"num_motion_frames": "motion_frames", "num_motion_latents": "motion_latents"}


@dataclass(frozen=True)
class VariantSpec:
    """What shards hold, what an adapter was trained on, and what its generation must follow.

    ``motion_frames`` (pixel hand-off) and ``motion_latents`` (latent hand-off) are the counts prepared in the
    shards, or drawn in training (0 motion latents: a clip-0 sample); the other hand-off's counts are empty.
    ``ref_pad_num`` is the padding of the pixel conditioning video (-1 anchor, 0 zeros, N anchor N times).
    """

    conditioning: str = "text"
    handoff: str = "pixel"
    ref_pad_num: int = -1
    motion_frames: tuple[int, ...] = (1,)
    motion_latents: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning must be one of {CONDITIONINGS}, got {self.conditioning!r}")
        if self.handoff not in HANDOFFS:
            raise ValueError(f"handoff must be one of {HANDOFFS}, got {self.handoff!r}")
        if self.ref_pad_num < -1:
            raise ValueError(f"ref_pad_num must be -1 (anchor), 0 (zeros) or N > 0, got {self.ref_pad_num}")
        object.__setattr__(self, "motion_frames", tuple(sorted(self.motion_frames)))
        object.__setattr__(self, "motion_latents", tuple(sorted(self.motion_latents)))

    def carried_only(self) -> VariantSpec:
        """This variant with the other hand-off's motion counts emptied: they mean nothing to it."""
        counts = make_handoff(self.handoff).counts
        return replace(self, **{name: () for name in ("motion_frames", "motion_latents") if name != counts})

    def to_record(self) -> dict[str, Any]:
        """Plain JSON (index.json's and svi.json's ``variant``)."""
        record = asdict(self)
        record["motion_frames"], record["motion_latents"] = list(self.motion_frames), list(self.motion_latents)
        return record

    @staticmethod
    def from_record(record: dict[str, Any], source: str) -> VariantSpec:
        """Read a ``variant`` record; an unknown or missing key names the file it came from."""
        try:
            return VariantSpec(**record)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source} holds a variant this version cannot read ({err}): {record}") from None

    def contradictions(self, trained: VariantSpec) -> list[str]:
        """What ``trained`` (a training run's variant) asks of these shards that they do not hold."""
        problems = []
        if trained.conditioning not in ("text", self.conditioning):  # text trains on any shards
            problems.append(f"conditioning={trained.conditioning} (the shards were prepared for {self.conditioning})")
        return problems + self._carried_differences(
            trained.handoff, trained.ref_pad_num, trained, "the shards were prepared with"
        )

    def prepare_command(self) -> str:
        """The ``data_tools prepare`` overrides that make shards for this variant."""
        overrides = [*make_conditioning(self.conditioning).prepare_flags, f"handoff={self.handoff}"]
        strategy = make_handoff(self.handoff)
        if strategy.padded:
            overrides.append(f"ref_pad_num={self.ref_pad_num}")
        counts = [n for n in getattr(self, strategy.counts) if n] or [1]  # 0 motion latents need no member
        overrides.append(f"{strategy.counts}=[{','.join(map(str, counts))}]")
        return f"python -m data_tools prepare {' '.join(overrides)} ..."

    def refusals(self, settings: Any) -> list[str]:
        """What a generation's ``settings`` ask of an adapter trained on this variant that it was not trained on."""
        problems = []
        if settings.conditioning != self.conditioning:
            problems.append(f"conditioning={settings.conditioning} (it was trained with {self.conditioning})")
        count = getattr(settings, make_handoff(settings.handoff).counts)
        carried = replace(self, motion_frames=(count,), motion_latents=(count,))
        return problems + self._carried_differences(
            settings.handoff, settings.ref_pad_num, carried, "it was trained with"
        )

    def _carried_differences(self, handoff: str, ref_pad_num: int, other: VariantSpec, mine: str) -> list[str]:
        """Hand-off, padding and motion counts ``other`` uses that this variant lacks (``mine``: "<who> was made
        with", for the messages)."""
        if handoff != self.handoff:
            return [f"handoff={handoff} ({mine} handoff={self.handoff})"]
        strategy = make_handoff(handoff)
        problems = []
        if strategy.padded and ref_pad_num != self.ref_pad_num:
            problems.append(f"ref_pad_num={ref_pad_num} ({mine} {self.ref_pad_num})")
        missing = sorted(set(getattr(other, strategy.counts)) - set(getattr(self, strategy.counts)) - {0})
        if missing:  # 0 motion latents: a clip-0 sample, which needs no motion
            problems.append(f"{strategy.counts} {missing} ({mine} {list(getattr(self, strategy.counts))})")
        return problems


def renamed_key_message(key: str) -> str | None:
    """The message for a dotted config key that was renamed (e.g. ``variant.motion_frames``), else None."""
    head, _, last = key.rpartition(".")
    new = RENAMED_KEYS.get(last)
    if new is None:
        return None
    return f"{key} is now called {head + '.' if head else ''}{new} (one name per concept; see CHANGELOG.md)"


def make_conditioning(name: str, **settings: Any) -> Conditioning:
    """The conditioning strategy for ``variant.conditioning`` (``settings``: its training dropout, its runtime
    resources such as Talk's audio encoder)."""
    from svi_infer.variants.dance import DanceConditioning
    from svi_infer.variants.talk import TalkConditioning
    from svi_infer.variants.text import TextConditioning

    kinds = {"text": TextConditioning, "audio": TalkConditioning, "pose": DanceConditioning}
    if name not in kinds:
        raise ValueError(f"variant.conditioning must be one of {CONDITIONINGS}, got {name!r}")
    return kinds[name](**settings)


def make_handoff(name: str) -> Handoff:
    """The hand-off strategy for ``variant.handoff``."""
    from svi_infer.variants.handoff import LatentHandoff, PixelHandoff

    kinds = {"pixel": PixelHandoff, "latent": LatentHandoff}
    if name not in kinds:
        raise ValueError(f"variant.handoff must be one of {HANDOFFS}, got {name!r}")
    return kinds[name]()
