"""The ``audiocraft`` backend: AudioGen (sound) and MusicGen (music) through Meta's
``audiocraft`` package (1.3.0, installed by ``scripts/install_audiocraft.sh``).

One class serves both services; ``spec.kind`` picks the model family. Weights come
from a local directory (``state_dict.bin`` + ``compression_state_dict.bin``) or a
hub id resolved into ``AUDIOCRAFT_CACHE_DIR``. Model weights are CC-BY-NC 4.0.

Checkpoint lookup lives in :mod:`core_base.backends.model_cache`; the fixes that
let audiocraft 1.3.0 run on current torch in :mod:`core_base.backends.audiocraft_compat`.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core_base.backends.audiocraft_compat import import_audiocraft, per_row_seeds
from core_base.backends.model_cache import (
    ModelSource,
    download_snapshot,
    resolve_checkpoint_files,
    route_library_logs,
)
from core_base.contracts import SamplingParams
from core_base.domain import Kind
from core_base.errors import PermanentError, SettingsError
from core_base.generation.load_lock import one_load_at_a_time
from core_base.generation.models import (
    CC_BY_NC_NOTICE,
    DEFAULT_CFG_COEF,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
    MODEL_WEIGHTS_LICENSE,
    SAMPLING_DEFAULTS,
    GeneratedAudio,
    GenerationItem,
    LoadProgressCallback,
    ProgressCallback,
    frame_count,
)

log = logging.getLogger(__name__)

BACKEND = "audiocraft"
CHECKPOINT_FILES = ("state_dict.bin", "compression_state_dict.bin")
# What AudioCraft loads from the Hugging Face hub (into its default cache, HF_HOME)
# besides the checkpoint: the T5 text encoder, and for MusicGen the 32 kHz EnCodec.
HUB_DEPENDENCIES: dict[Kind, tuple[str, ...]] = {
    Kind.SOUND: ("t5-large",),
    Kind.MUSIC: ("t5-base", "facebook/encodec_32khz"),
}
# Windowed continuation past the native window advances by this fraction of it:
# AudioCraft's defaults, 2 s of AudioGen's 10 s and 18 s of MusicGen's 30 s.
EXTEND_STRIDE_FRACTION = {Kind.SOUND: 0.2, Kind.MUSIC: 0.6}
# --- the adapter ------------------------------------------------------------------


@dataclass(frozen=True)
class _Group:
    """Items generated in one audiocraft call: same codec frames, sampling params
    and prompt token count."""

    frames: int  # codec frames to generate
    params: SamplingParams
    indices: tuple[int, ...]


class AudioCraftAdapter:
    """AudioGen (``Kind.SOUND``) or MusicGen (``Kind.MUSIC``) through audiocraft."""

    backend = BACKEND
    # Batched matrix products round differently from one item alone.
    batch_invariant = False

    def __init__(
        self,
        *,
        kind: Kind,
        model_id: str,
        sample_rate: int,
        channels: int,
        cache_dir: Path | None,
        model_root: Path | None,
        device: str | None = None,
        variable: str = "MODEL",
    ) -> None:
        """``variable``: the setting that names the model, for errors (``AUDIO_GEN_MODEL``)."""
        self.kind = kind
        self.model_id = model_id
        self.sample_rate = sample_rate
        self.channels = channels
        self._cache_dir = cache_dir
        self._model_root = model_root
        self._device_override = device
        self._variable = variable
        self._model: Any = None
        self._resolved: ModelSource | None = None
        self._device = "cpu"
        # set_generation_params mutates the model: one generation at a time.
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Any, spec: Any) -> AudioCraftAdapter:
        """Build from a ``GenerationSettings`` and the service's ``ServiceSpec``."""
        model_id = settings.model or spec.default_model
        return cls(
            kind=spec.kind,
            model_id=model_id,
            sample_rate=spec.sample_rate,
            channels=spec.channels,
            cache_dir=settings.audiocraft_cache_dir,
            model_root=settings.audiocraft_cache_dir or settings.cache_model_dir,
            variable=f"{spec.env_prefix}MODEL",
        )

    # --- loading ----------------------------------------------------------------

    def load(self, progress: LoadProgressCallback | None = None) -> None:
        """Resolve the checkpoints and load them onto CUDA when available (blocking)."""
        report = progress or (lambda fraction, message: None)
        with one_load_at_a_time(report):
            self._load(report)

    def _load(self, report: LoadProgressCallback) -> None:
        report(0.0, "importing audiocraft")
        models = import_audiocraft()
        route_library_logs()  # audiocraft's text encoder is transformers' T5
        import torch

        self._device = self._device_override or ("cuda" if torch.cuda.is_available() else "cpu")
        report(0.1, f"resolving {self.model_id}")
        self._resolved = self._resolve()
        report(0.3, f"loading {self.model_id} on {self._device}")
        family = models.AudioGen if self.kind is Kind.SOUND else models.MusicGen
        self._check_hub_dependencies()
        model = family.get_pretrained(str(self._resolved.path), device=self._device)
        if int(model.sample_rate) != self.sample_rate or int(model.audio_channels) != self.channels:
            raise SettingsError(
                f"{self._variable}: {self.model_id} is a {model.sample_rate} Hz,"
                f" {model.audio_channels}-channel model; this service needs"
                f" {self.sample_rate} Hz, {self.channels}-channel audio"
            )
        self._model = model
        report(1.0, "ready")
        log.info("audiocraft: %s loaded on %s (%s)", self.model_id, self._device, CC_BY_NC_NOTICE)

    def _check_hub_dependencies(self) -> None:
        """Offline, the hub parts AudioCraft loads besides the weights must be in the
        hub cache: one configuration error naming the missing ones, not AudioCraft's
        tracebacks. (Online, AudioCraft fetches them itself.)"""
        from huggingface_hub import constants

        if not constants.HF_HUB_OFFLINE:
            return
        missing = []
        for dependency in HUB_DEPENDENCIES[self.kind]:
            try:
                download_snapshot(
                    dependency, cache_dir=Path(constants.HF_HUB_CACHE), local_files_only=True
                )
            except SettingsError:
                missing.append(dependency)
        if missing:
            raise SettingsError(
                f"{self._variable}: AudioCraft also loads {', '.join(missing)} from the"
                f" Hugging Face hub, which HF_HUB_OFFLINE keeps it from, and the hub cache"
                f" ({constants.HF_HUB_CACHE}) does not hold: run `audiocraft-service"
                f" download-model {self.model_id}` (it fetches them too), or unset"
                " HF_HUB_OFFLINE"
            )

    def _resolve(self) -> ModelSource:
        return resolve_checkpoint_files(
            self.model_id,
            files=CHECKPOINT_FILES,
            model_root=self._model_root,
            cache_dir=self._cache_dir,
            library_name="audiocraft",
            variable=self._variable,
        )

    # --- generation -----------------------------------------------------------------

    def generate(
        self, batch: Sequence[GenerationItem], progress: ProgressCallback | None = None
    ) -> list[GeneratedAudio]:
        """One audio per item, exactly ``frame_count(duration_s, sample_rate)`` frames.

        Items are generated together when they need the same number of codec
        frames, the same sampling params and prompts of the same token count
        (:meth:`prompt_batch_key`); each row samples from its own generator seeded
        with ``item.seed``. Blocking.
        """
        if self._model is None:
            raise RuntimeError("AudioCraftAdapter.generate called before load()")
        if not batch:
            return []
        groups = self._groups(batch)
        totals = [self._planned_steps(group.frames) for group in groups]
        steps_total = sum(totals)
        results: list[GeneratedAudio | None] = [None] * len(batch)
        done_before = 0
        with self._lock:
            for group, group_total in zip(groups, totals, strict=True):
                items = [batch[index] for index in group.indices]
                audio = self._generate_group(
                    items, group, _StepCounter(progress, done_before, group_total, steps_total)
                )
                for index, samples in zip(group.indices, audio, strict=True):
                    results[index] = GeneratedAudio(samples=samples, sample_rate=self.sample_rate)
                done_before += group_total
        if progress is not None:
            progress(steps_total, steps_total)
        return [result for result in results if result is not None]

    def _groups(self, batch: Sequence[GenerationItem]) -> list[_Group]:
        keyed: dict[tuple[int, SamplingParams, Hashable], list[int]] = {}
        for index, item in enumerate(batch):
            if not math.isfinite(item.duration_s) or item.duration_s <= 0:
                raise PermanentError(f"duration must be positive (got {item.duration_s})")
            key = (
                self._frames_for(item.duration_s),
                item.params,
                self.prompt_batch_key(item.prompt),
            )
            keyed.setdefault(key, []).append(index)
        return [
            _Group(frames=frames, params=params, indices=tuple(indices))
            for (frames, params, _), indices in keyed.items()
        ]

    def prompt_batch_key(self, prompt: str) -> Hashable:
        """What a prompt's batch-mates must share for its audio not to depend on them.

        AudioCraft's T5 conditioner pads a batch's prompts to the longest and zeroes
        the padding, but its cross-attention takes no padding mask: the zero keys
        still draw attention weight. A prompt batched with a longer one would sound
        different from the same prompt and seed alone (SPEC: same seed, prompt and
        params give the same audio). So only prompts of one token count go
        together; the worker batches by this key, and :meth:`generate` groups by it
        too for callers that do not. Where the tokenizer is not the plain T5 one,
        each distinct prompt goes alone (the prompt itself is the key)."""
        conditioners = self._model.lm.condition_provider.conditioners  # a ModuleDict
        conditioner = conditioners["description"] if "description" in conditioners else None
        tokenizer = getattr(conditioner, "t5_tokenizer", None)
        if tokenizer is None or getattr(conditioner, "normalize_text", False):
            return prompt
        return len(tokenizer(prompt)["input_ids"])

    def _frames_for(self, duration_s: float) -> int:
        samples = frame_count(duration_s, self.sample_rate)
        hop = self.sample_rate / float(self._model.frame_rate)
        return max(1, math.ceil(samples / hop))

    def _generation_duration_s(self, frames: int) -> float:
        """A duration from which audiocraft's ``int(duration * frame_rate)`` gives
        exactly ``frames``, without crossing into windowed continuation needlessly."""
        frame_rate = float(self._model.frame_rate)
        max_duration_s = float(self._model.max_duration)
        if frames <= int(max_duration_s * frame_rate):
            return min((frames + 0.5) / frame_rate, max_duration_s)
        return (frames + 0.5) / frame_rate

    def _extend_stride_s(self) -> float:
        return float(self._model.max_duration) * EXTEND_STRIDE_FRACTION[self.kind]

    def _planned_steps(self, frames: int) -> int:
        """Decoding steps for ``frames``: one per frame plus the delay pattern's tail
        (``n_q - 1``), per window of the windowed continuation."""
        delay_tail = int(self._model.lm.n_q) - 1
        frame_rate = float(self._model.frame_rate)
        window = int(float(self._model.max_duration) * frame_rate)
        if frames <= window:
            return frames + delay_tail
        stride = int(self._extend_stride_s() * frame_rate)
        steps, offset, prompt = 0, 0, 0
        while offset + prompt < frames:
            chunk = min(frames - offset, window)
            steps += chunk - prompt + delay_tail
            prompt = chunk - stride
            offset += stride
        return steps

    def _generate_group(
        self, items: Sequence[GenerationItem], group: _Group, counter: _StepCounter
    ) -> list[np.ndarray[Any, np.dtype[np.float32]]]:
        import torch

        params = group.params
        self._model.set_generation_params(
            use_sampling=True,
            top_k=DEFAULT_TOP_K if params.top_k is None else params.top_k,
            top_p=DEFAULT_TOP_P if params.top_p is None else params.top_p,
            temperature=DEFAULT_TEMPERATURE if params.temperature is None else params.temperature,
            duration=self._generation_duration_s(group.frames),
            cfg_coef=DEFAULT_CFG_COEF if params.cfg_coef is None else params.cfg_coef,
            extend_stride=self._extend_stride_s(),
        )
        self._model.set_custom_progress_callback(counter)
        try:
            with (
                per_row_seeds([item.seed for item in items], self._device),
                torch.inference_mode(),
            ):
                wav = self._model.generate([item.prompt for item in items], progress=True)
        finally:
            self._model.set_custom_progress_callback(None)
        audio = wav.detach().to(device="cpu", dtype=torch.float32).numpy()
        return [
            self._exact_length(row, item.duration_s) for row, item in zip(audio, items, strict=True)
        ]

    def _exact_length(
        self, samples: np.ndarray[Any, Any], duration_s: float
    ) -> np.ndarray[Any, np.dtype[np.float32]]:
        frames = frame_count(duration_s, self.sample_rate)
        produced = samples.shape[-1]
        if produced < frames:
            # Codec rounding can leave the last frame short by a few samples only.
            if frames - produced > self.sample_rate // int(self._model.frame_rate):
                raise RuntimeError(f"audiocraft produced {produced} samples, {frames} needed")
            samples = np.pad(samples, ((0, 0), (0, frames - produced)))
        trimmed = np.clip(samples[:, :frames], -1.0, 1.0)
        return np.ascontiguousarray(trimmed, dtype=np.float32)

    # --- description -------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """Backend, model, checkpoint revision, device and licence."""
        return {
            "backend": self.backend,
            "model_id": self.model_id,
            "family": "AudioGen" if self.kind is Kind.SOUND else "MusicGen",
            "revision": self._resolved.revision if self._resolved else None,
            "checkpoint": str(self._resolved.path) if self._resolved else None,
            "device": self._device,
            "sample_rate": self.sample_rate,
            "channels": self.channels,
            "native_max_duration_s": float(self._model.max_duration) if self._model else None,
            "audiocraft_version": _package_version("audiocraft"),
            "license": MODEL_WEIGHTS_LICENSE,
            "license_notice": CC_BY_NC_NOTICE,
            "sampling_defaults": dict(SAMPLING_DEFAULTS),
        }


class _StepCounter:
    """audiocraft's progress callback, mapped onto the whole batch's steps.

    audiocraft reports per window (its totals restart in each window), so steps
    are counted here, one per callback, and capped below the batch total until
    :meth:`AudioCraftAdapter.generate` reports completion.
    """

    def __init__(
        self, progress: ProgressCallback | None, offset: int, group_total: int, batch_total: int
    ) -> None:
        self._progress = progress
        self._offset = offset
        self._group_total = group_total
        self._batch_total = batch_total
        self._done = 0

    def __call__(self, generated: int, to_generate: int) -> None:
        del generated, to_generate
        self._done = min(self._done + 1, self._group_total)
        if self._progress is not None:
            self._progress(min(self._offset + self._done, self._batch_total - 1), self._batch_total)


def _package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


__all__ = ["AudioCraftAdapter", "import_audiocraft"]
