"""What a synth layer is given (:class:`Context`) and what it returns (:class:`Layer`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from core_base.backends.synth.music import MusicStyle

Signal = npt.NDArray[np.float64]


@dataclass
class Context:
    """Everything a layer needs to render itself."""

    frames: int
    sample_rate: int
    rng: np.random.Generator  # prompt + seed + params: the details
    style: np.random.Generator  # prompt only: the character
    words: frozenset[str]
    temperature: float
    music: MusicStyle = field(init=False)

    @property
    def duration_s(self) -> float:
        return self.frames / self.sample_rate

    @property
    def top_hz(self) -> float:
        """Highest frequency worth generating (below Nyquist, with margin)."""
        return 0.45 * self.sample_rate


@dataclass(frozen=True)
class Layer:
    """One signal of the mix, at its peak times ``weight``, panned by ``pan``."""

    signal: Signal
    weight: float
    pan: float = 0.0  # -1 left .. 1 right


LayerFn = Callable[[Context], list[Layer]]
