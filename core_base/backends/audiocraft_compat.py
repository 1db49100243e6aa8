"""Compatibility fixes for running Meta's ``audiocraft`` 1.3.0 on current torch,
each applied narrowly and idempotently by :func:`import_audiocraft`:

- stand-ins for modules audiocraft imports at start-up but text-to-audio
  inference never calls (xformers, spacy, librosa, torchaudio);
- checkpoint loading that survives torch >= 2.6's ``weights_only`` default
  (:func:`_install_checkpoint_loader`);
- per-row random generators, so that a seed means the same thing in a batch as
  alone (:func:`_install_per_row_sampling`, used through :func:`per_row_seeds`);
- guidance and temperature applied to float32 logits on a GPU too
  (:func:`_install_float32_logits`).
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import importlib.machinery
import logging
import pickle
import sys
import threading
import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

# Modules audiocraft 1.3.0 imports at start-up that text-to-audio inference does
# not use; stood in for only when they are not importable (see import_audiocraft).
OPTIONAL_IMPORTS = ("xformers", "spacy", "librosa", "torchaudio")
# Submodules audiocraft imports by name (``from librosa import filters``).
_STAND_IN_SUBMODULES = {
    "xformers": ("ops",),
    "librosa": ("filters",),
    "torchaudio": ("transforms", "functional"),
}

_import_lock = threading.Lock()
_row_generators: contextvars.ContextVar[list[Any] | None] = contextvars.ContextVar(
    "audiocraft_row_generators", default=None
)


def import_audiocraft() -> types.ModuleType:
    """Import ``audiocraft.models`` with the fixes this backend needs; idempotent.

    audiocraft 1.3.0 imports xformers (memory-efficient attention; we run torch's
    kernel), spacy (training-time text normalisation), librosa and torchaudio
    (melody chroma, loudness normalisation when writing files) at start-up. They
    are not installed by ``install_audiocraft.sh`` (torchaudio on PyPI is a CUDA
    build that does not load next to a CPU torch), so when one cannot be imported
    an inert module takes its place: any use of it raises a clear error. The one
    xformers function the attention layers call on the torch path, ``unbind``,
    is torch's own.
    """
    with _import_lock:
        for name in OPTIONAL_IMPORTS:
            _ensure_importable(name)
        models = importlib.import_module("audiocraft.models")
        _install_checkpoint_loader()
        _install_per_row_sampling()
        _install_float32_logits()
    return models


def _ensure_importable(name: str) -> None:
    if name in sys.modules:
        return
    try:
        importlib.import_module(name)
    except (ImportError, OSError) as exc:  # OSError: a wheel whose native libs do not load
        for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[loaded]
        log.info("audiocraft: %s unavailable (%s); using an inert stand-in", name, exc)
        _install_stand_in(name)


class _Unavailable:
    """What a stand-in module hands out for any name: importable, unusable."""

    def __init__(self, qualified_name: str) -> None:
        self._name = qualified_name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        package = self._name.partition(".")[0]
        raise RuntimeError(
            f"{self._name}: {package} is not installed; the audiocraft feature that "
            "needs it (melody conditioning, loudness normalisation, xformers "
            "attention, text normalisation) is unavailable in this deployment"
        )

    def __getattr__(self, name: str) -> _Unavailable:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Unavailable(f"{self._name}.{name}")


class _CausalMarker:
    """Stands in for ``xformers.ops.LowerTriangularMask``, which audiocraft only
    tests for ``None`` on the torch attention path."""


def _stand_in_module(name: str) -> types.ModuleType:
    module = types.ModuleType(name, f"Inert stand-in for {name} (audiocraft backend).")
    # A spec keeps importlib.util.find_spec (used by transformers' availability
    # checks) from raising; importlib.metadata still finds no distribution.
    module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)

    def attribute(attribute_name: str) -> Any:
        if attribute_name.startswith("__"):
            raise AttributeError(attribute_name)
        return _Unavailable(f"{name}.{attribute_name}")

    module.__getattr__ = attribute  # type: ignore[method-assign]
    return module


def _install_stand_in(name: str) -> None:
    module = _stand_in_module(name)
    sys.modules[name] = module
    for child in _STAND_IN_SUBMODULES.get(name, ()):
        submodule = _stand_in_module(f"{name}.{child}")
        setattr(module, child, submodule)
        sys.modules[submodule.__name__] = submodule
    if name == "xformers":
        import torch

        # On the torch attention path audiocraft still splits packed q/k/v with
        # ops.unbind (xformers' is torch.unbind with a leaner backward) and builds
        # a LowerTriangularMask as a mere "causal" marker for torch's kernel.
        ops = sys.modules["xformers.ops"]
        ops.unbind = torch.unbind  # type: ignore[attr-defined]
        ops.LowerTriangularMask = _CausalMarker  # type: ignore[attr-defined]


class _CheckpointTorch(types.ModuleType):
    """``torch`` as seen by ``audiocraft.models.loaders`` only.

    torch >= 2.6 loads with ``weights_only=True`` by default and the released
    AudioGen checkpoint does not pass (upstream PR facebookresearch/audiocraft#534).
    Loading stays safe first; only a file the safe unpickler refuses is loaded
    in full, which is acceptable because the loaders only open the checkpoints
    this deployment was configured with.
    """

    def __init__(self, torch_module: types.ModuleType) -> None:
        super().__init__("torch")
        self._torch = torch_module

    def __getattr__(self, name: str) -> Any:
        return getattr(self._torch, name)

    def load(self, *args: Any, **kwargs: Any) -> Any:
        if "weights_only" in kwargs:
            return self._torch.load(*args, **kwargs)
        try:
            return self._torch.load(*args, weights_only=True, **kwargs)
        except pickle.UnpicklingError as exc:
            log.warning("audiocraft: checkpoint needs a full unpickle (%s)", str(exc)[:200])
            return self._torch.load(*args, weights_only=False, **kwargs)


def _install_checkpoint_loader() -> None:
    import torch
    from audiocraft.models import loaders

    # Only this module's view of torch changes; torch.load elsewhere is untouched.
    if not isinstance(getattr(loaders, "torch", None), _CheckpointTorch):
        setattr(loaders, "torch", _CheckpointTorch(torch))  # noqa: B010


def _install_per_row_sampling() -> None:
    """Sample each row of a batch from its own generator while one is set.

    AudioCraft draws every token with ``audiocraft.utils.utils.multinomial`` from
    torch's global generator, so a row's tokens would depend on its batch-mates.
    Inside :func:`per_row_seeds` each row draws from a generator seeded with its
    item's seed instead; elsewhere the original function runs unchanged.
    """
    from audiocraft.utils import utils

    original = utils.multinomial
    if getattr(original, "_per_row", False):
        return

    def multinomial(
        input: Any, num_samples: int, replacement: bool = False, *, generator: Any = None
    ) -> Any:
        generators = _row_generators.get()
        if generators is None or generator is not None:
            return original(input, num_samples, replacement=replacement, generator=generator)
        if input.shape[0] != len(generators):
            raise RuntimeError(
                f"audiocraft sampled {input.shape[0]} rows for {len(generators)} seeds"
            )
        import torch

        rows = [
            original(row, num_samples, replacement=replacement, generator=row_generator)
            for row, row_generator in zip(input, generators, strict=True)
        ]
        return torch.stack(rows)

    multinomial._per_row = True  # type: ignore[attr-defined]
    utils.multinomial = multinomial


def _install_float32_logits() -> None:
    """The language model's logits in float32, whatever precision it runs in.

    On a GPU AudioCraft runs the model under float16 autocast, then mixes the
    logits for classifier-free guidance and divides them by the temperature in
    float16: with a high ``cfg_coef`` and a low temperature they pass float16's
    65,504, the probabilities turn NaN and the task fails. Returned as float32
    (one [batch, codebooks, steps, 2048] tensor per step, little beside the model's
    own work), that arithmetic is done in float32.
    """
    from audiocraft.models.lm import LMModel

    original = LMModel.forward
    if getattr(original, "_float32_logits", False):
        return

    @functools.wraps(original)
    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        return original(self, *args, **kwargs).float()

    forward._float32_logits = True  # type: ignore[attr-defined]
    LMModel.forward = forward  # type: ignore[method-assign]


@contextmanager
def per_row_seeds(seeds: Sequence[int], device: Any) -> Iterator[None]:
    """Within the block, audiocraft samples row ``i`` of a batch from a generator
    on ``device`` seeded with ``seeds[i]``."""
    import torch

    generators = []
    for seed in seeds:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        generators.append(generator)
    token = _row_generators.set(generators)
    try:
        yield
    finally:
        _row_generators.reset(token)
