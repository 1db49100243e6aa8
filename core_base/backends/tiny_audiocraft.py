"""Tiny, randomly initialised AudioGen / MusicGen of the real architecture, for tests.

No weights can be downloaded on the development machines, so tests build a model
from AudioCraft's own YAML configs (composed with OmegaConf in the order Hydra
would use for the released solvers), shrink the sizes, and save it in the layout
``get_pretrained(directory)`` reads:

- ``state_dict.bin``: ``{"best_state": ..., "xp.cfg": <yaml>}`` for the LM;
- ``compression_state_dict.bin``: AudioGen carries its own 16 kHz EnCodec
  (``xp.cfg`` + weights); MusicGen points at ``facebook/encodec_32khz`` on the hub.

At load time AudioCraft also fetches the T5 tokenizer/encoder (``t5-large`` for
AudioGen, ``t5-base`` for MusicGen) and, for MusicGen, ``facebook/encodec_32khz``
through the Hugging Face hub. Here they are tiny stand-ins written into a private
hub cache (``<directory>/hub``) that :func:`offline_hub` points the loader at with
offline mode on. A real deployment does none of this: the released checkpoints
sit in ``AUDIOCRAFT_CACHE_DIR`` (or are downloaded there) and the real T5/EnCodec
in the normal Hugging Face cache (``HF_HOME``).

AudioCraft's YAML configs ship in its source distribution but are not installed
with the wheel; ``scripts/install_audiocraft.sh`` extracts them to
``<sys.prefix>/share/audiocraft/config`` (``AUDIOCRAFT_CONFIG_DIR`` overrides).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from core_base.domain import Kind
from core_base.errors import SettingsError

# The tiny models' native windows: as short as AudioCraft allows, so that tests
# reach the windowed continuation cheaply. The constructors call
# set_generation_params with the default extend_stride (AudioGen 2 s, MusicGen
# 18 s), which must be shorter than the window.
TINY_SEGMENT_DURATION_S = {Kind.SOUND: 2.5, Kind.MUSIC: 20.0}
# A fixed fake commit for the stand-ins' hub cache entries.
_STAND_IN_REVISION = "0" * 40
_T5_DIMS = {"t5-base": 768, "t5-large": 1024}  # what AudioCraft's output_proj expects
_ENCODEC_32KHZ = "facebook/encodec_32khz"


def audiocraft_config_dir() -> Path:
    """Where AudioCraft's ``config/`` tree was installed."""
    configured = os.environ.get("AUDIOCRAFT_CONFIG_DIR")
    path = Path(configured) if configured else Path(sys.prefix) / "share" / "audiocraft" / "config"
    if not (path / "config.yaml").is_file():
        raise SettingsError(
            f"AUDIOCRAFT_CONFIG_DIR: AudioCraft's configs not found at {path}; "
            "run scripts/install_audiocraft.sh"
        )
    return path


def compose_lm_config(kind: Kind, config_dir: Path | None = None) -> Any:
    """The released solver's config (``audiogen_base_16khz`` / ``musicgen_base_32khz``)
    at the ``xsmall`` model scale, composed from AudioCraft's YAML files."""
    root = config_dir or audiocraft_config_dir()
    family = "audiogen" if kind is Kind.SOUND else "musicgen"
    solver = "audiogen_base_16khz" if kind is Kind.SOUND else "musicgen_base_32khz"
    conditioner = "text2sound" if kind is Kind.SOUND else "text2music"
    files = [
        "config.yaml",
        "solver/default.yaml",
        "solver/musicgen/default.yaml",
        f"solver/{family}/default.yaml",
        "model/lm/default.yaml",
        f"model/lm/{family}_lm.yaml",
        "model/lm/model_scale/xsmall.yaml",
        f"conditioner/{conditioner}.yaml",
        f"solver/{family}/{solver}.yaml",
    ]
    return _merge(root, files, _lm_overrides(kind))


def compose_compression_config(config_dir: Path | None = None) -> Any:
    """AudioGen's 16 kHz EnCodec (``encodec_audiogen_16khz``), shrunk."""
    root = config_dir or audiocraft_config_dir()
    files = [
        "config.yaml",
        "solver/default.yaml",
        "model/encodec/default.yaml",
        "model/encodec/encodec_large_nq4_s320.yaml",
        "solver/compression/encodec_audiogen_16khz.yaml",
    ]
    return _merge(root, files, _compression_overrides())


def build_tiny_audiocraft(directory: Path, kind: Kind) -> Path:
    """Write a tiny random model for ``kind`` and its hub stand-ins under ``directory``;
    return the model directory to pass to ``get_pretrained`` (load it inside
    :func:`offline_hub` ``(directory)``)."""
    import torch
    from omegaconf import OmegaConf

    kind = Kind(kind)  # "sound" from a caller is Kind.SOUND (kinds are compared by identity)
    model_dir = directory / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    hub = directory / "hub"
    t5_name = "t5-large" if kind is Kind.SOUND else "t5-base"
    _write_tiny_t5(hub, t5_name)
    if kind is Kind.MUSIC:
        _write_tiny_hf_encodec(hub)

    torch.manual_seed(1234 if kind is Kind.SOUND else 4321)
    lm_cfg = compose_lm_config(kind)
    with offline_hub(directory):
        lm_state = _build_lm_state(lm_cfg)
    torch.save(
        {"best_state": lm_state, "xp.cfg": OmegaConf.to_yaml(lm_cfg), "exported": True},
        model_dir / "state_dict.bin",
    )
    if kind is Kind.SOUND:
        compression_cfg = compose_compression_config()
        torch.save(
            {
                "best_state": _build_compression_state(compression_cfg),
                "xp.cfg": OmegaConf.to_yaml(compression_cfg),
                "exported": True,
            },
            model_dir / "compression_state_dict.bin",
        )
    else:
        torch.save({"pretrained": _ENCODEC_32KHZ}, model_dir / "compression_state_dict.bin")
    return model_dir


@contextmanager
def offline_hub(directory: Path) -> Iterator[None]:
    """Point the Hugging Face hub client at ``<directory>/hub`` in offline mode.

    huggingface_hub reads its cache path and offline flag into module constants at
    import time, so the constants are patched as well as the environment (for
    anything imported later). Not thread-safe; meant for tests and tooling.
    """
    from huggingface_hub import constants

    cache = str(directory / "hub")
    saved_env = {name: os.environ.get(name) for name in ("HF_HUB_OFFLINE", "HF_HUB_CACHE")}
    saved_constants = (constants.HF_HUB_OFFLINE, constants.HF_HUB_CACHE)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_HUB_CACHE"] = cache
    constants.HF_HUB_OFFLINE = True
    constants.HF_HUB_CACHE = cache
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, constants.HF_HUB_CACHE = saved_constants
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# --- configs ----------------------------------------------------------------


def _merge(root: Path, files: list[str], overrides: dict[str, Any]) -> Any:
    from omegaconf import OmegaConf

    merged: Any = OmegaConf.create()
    for name in files:
        part: Any = OmegaConf.load(root / name)
        part.pop("defaults", None)  # Hydra's composition list, applied here by hand
        merged = OmegaConf.merge(merged, part)
    merged = OmegaConf.merge(merged, OmegaConf.create(overrides))
    OmegaConf.set_struct(merged, True)
    return merged


def _lm_overrides(kind: Kind) -> dict[str, Any]:
    return {
        "device": "cpu",
        "dtype": "float32",
        "dataset": {"segment_duration": TINY_SEGMENT_DURATION_S[kind]},
        "transformer_lm": {"dim": 32, "num_heads": 2, "num_layers": 2, "hidden_scale": 2},
    }


def _compression_overrides() -> dict[str, Any]:
    return {
        "device": "cpu",
        "seanet": {"n_filters": 2, "dimension": 16, "lstm": 1},
        # Random codebooks instead of k-means on data that does not exist: with
        # k-means init the untrained codebooks are zeros and every token decodes
        # to the same audio.
        "rvq": {"kmeans_init": False},
    }


def _build_lm_state(cfg: Any) -> dict[str, Any]:
    from core_base.backends.audiocraft_compat import import_audiocraft

    builders = import_audiocraft().builders
    lm = builders.get_lm_model(cfg)
    return dict(lm.state_dict())


def _build_compression_state(cfg: Any) -> dict[str, Any]:
    from core_base.backends.audiocraft_compat import import_audiocraft

    model = import_audiocraft().builders.get_compression_model(cfg)
    return dict(model.state_dict())


# --- hub stand-ins --------------------------------------------------------------


def _snapshot_dir(hub: Path, repo_id: str) -> Path:
    """Create the hub cache layout for ``repo_id`` and return its snapshot folder."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(_STAND_IN_REVISION)
    snapshot = repo / "snapshots" / _STAND_IN_REVISION
    snapshot.mkdir(parents=True, exist_ok=True)
    return snapshot


def _write_tiny_t5(hub: Path, name: str) -> None:
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    snapshot = _snapshot_dir(hub, name)
    # A character-level unigram vocabulary: every prompt tokenises, and different
    # prompts give different ids.
    pieces = ["<pad>", "</s>", "<unk>", "\u2581"]
    pieces += [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces += ["\u2581" + chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces += list("0123456789.,!?-'")
    vocab = [
        (piece, 0.0 if index < 3 else -1.0 - index / 100) for index, piece in enumerate(pieces)
    ]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    tokenizer.save_pretrained(snapshot)
    config = T5Config(
        vocab_size=len(pieces),
        d_model=_T5_DIMS[name],
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
    )
    T5EncoderModel(config).save_pretrained(snapshot)


def _write_tiny_hf_encodec(hub: Path) -> None:
    from transformers import EncodecConfig, EncodecModel

    snapshot = _snapshot_dir(hub, _ENCODEC_32KHZ)
    config = EncodecConfig(
        sampling_rate=32_000,
        audio_channels=1,
        # The released model's geometry: hop 640 (50 frames/s), 4 codebooks of
        # 2048 codes at 2.2 kbps; only the widths are tiny.
        upsampling_ratios=[8, 5, 4, 4],
        target_bandwidths=[2.2],
        codebook_size=2048,
        hidden_size=16,
        num_filters=2,
        num_residual_layers=1,
        num_lstm_layers=1,
        codebook_dim=16,
        normalize=False,
        use_causal_conv=False,
    )
    import torch

    model = EncodecModel(config)
    # transformers initialises codebooks to zeros (the released ones are trained):
    # every code would decode to the same audio. Random codebooks keep the
    # tokens audible in the output.
    generator = torch.Generator().manual_seed(32_000)
    with torch.no_grad():
        for layer in model.quantizer.layers:
            codebook: Any = layer.codebook
            codebook.embed.copy_(torch.randn(codebook.embed.shape, generator=generator))
            codebook.embed_avg.copy_(codebook.embed)
    model.save_pretrained(snapshot)
