"""The model adapter port: what a generation backend must implement.

An adapter is tiny: ``load()`` and ``generate(batch)``. Queueing, batching,
encoding, storage and callbacks are generic and live in the worker.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from core_base.contracts import SamplingParams

# Called with (steps_done, steps_total) as generation advances; must be cheap.
ProgressCallback = Callable[[int, int], None]
# Called with (fraction 0..1, message) while weights load.
LoadProgressCallback = Callable[[float, str], None]

CC_BY_NC_NOTICE = (
    "Model weights of MusicGen/AudioGen are licensed CC-BY-NC 4.0 (non-commercial use only)"
)
# The same as an SPDX identifier, for tools that read the facts.
MODEL_WEIGHTS_LICENSE = "CC-BY-NC-4.0"


# AudioCraft's sampling defaults (shared/MODELS.md): what the model backends use
# for a param a task leaves unset (None in SamplingParams).
DEFAULT_TOP_K = 250
DEFAULT_TOP_P = 0.0
DEFAULT_TEMPERATURE = 1.0
DEFAULT_CFG_COEF = 3.0
SAMPLING_DEFAULTS: dict[str, float] = {
    "top_k": DEFAULT_TOP_K,
    "top_p": DEFAULT_TOP_P,
    "temperature": DEFAULT_TEMPERATURE,
    "cfg_coef": DEFAULT_CFG_COEF,
}


@dataclass(frozen=True)
class GenerationItem:
    """One prompt of a batch, with the seed already chosen by the worker."""

    prompt: str
    duration_s: float
    seed: int
    params: SamplingParams = field(default_factory=SamplingParams)


def frame_count(duration_s: float, sample_rate: int) -> int:
    """The frames of ``duration_s`` of audio, at least one: a duration under half a
    sample would round to none, an empty file that no player (and no FLAC or MP3
    decoder) takes."""
    return max(1, round(duration_s * sample_rate))


@dataclass
class GeneratedAudio:
    """float32 samples in [-1, 1], shape (channels, frames)."""

    samples: npt.NDArray[np.float32]
    sample_rate: int

    @property
    def channels(self) -> int:
        return int(self.samples.shape[0])

    @property
    def duration_s(self) -> float:
        return float(self.samples.shape[1]) / self.sample_rate


# The facts every backend's ``describe()`` names alike, so that a worker's /readyz
# and a generation record read the same on any backend.
DESCRIBE_KEYS = (
    "backend",
    "model_id",
    "revision",
    "device",
    "sample_rate",
    "channels",
    "license",
)


class ModelAdapter(Protocol):
    """A loaded (or loadable) generation model."""

    backend: str  # "synth", "transformers", "audiocraft"
    # True when an item's output is bit-identical whatever else is in its batch.
    # Model backends batch matrix products, whose rounding depends on the batch.
    batch_invariant: bool
    model_id: str
    sample_rate: int
    channels: int

    def load(self, progress: LoadProgressCallback | None = None) -> None:
        """Load weights (blocking; the worker calls it in a thread)."""

    def generate(
        self, batch: Sequence[GenerationItem], progress: ProgressCallback | None = None
    ) -> list[GeneratedAudio]:
        """Generate one audio per item, each exactly ``item.duration_s`` long.

        Blocking; the worker runs it off the event loop. Raises on failure; the
        worker then retries items one by one so that one bad item fails alone.
        """
        ...

    def describe(self) -> dict[str, Any]:
        """Reproducibility and licence facts: every backend gives at least
        :data:`DESCRIBE_KEYS` (a value may be None before :meth:`load`), then its own."""
        ...

    def prompt_batch_key(self, prompt: str) -> Hashable:
        """What prompts must share to be generated in one batch without changing
        each other's audio (None: any prompts may). The worker batches by it."""
        ...


# A factory builds an adapter from the service's settings and spec
# (a GenerationSettings and a ServiceSpec; typed loosely to avoid an import cycle).
AdapterFactory = Callable[[Any, Any], ModelAdapter]


def lazy_adapter(path: str) -> AdapterFactory:
    """A factory for ``"package.module:Class"``, imported only when used, so that a
    base install without torch can still run the synth backend. The class must
    have ``from_settings(settings, spec)``."""

    def factory(settings: Any, spec: Any) -> ModelAdapter:
        import importlib

        module_name, _, class_name = path.partition(":")
        cls = getattr(importlib.import_module(module_name), class_name)
        adapter: ModelAdapter = cls.from_settings(settings, spec)
        return adapter

    return factory
