"""MusicGen through Hugging Face ``transformers`` (SPEC §5, ``backend=transformers``).

The decoding loop is ours, built on the model's own modules (text encoder,
decoder with its KV cache, EnCodec), rather than ``model.generate``, because the
service needs four things ``generate`` does not give:

* **per-item reproducibility**: each item samples with its own generator seeded
  from its own seed, so an item's audio does not depend on its batch-mates;
* **progress** after every decoding step;
* **windowed continuation** past the native maximum from the last
  ``window - stride`` seconds of *tokens* (as AudioCraft does), which needs the
  tokens, not only the decoded audio;
* EnCodec decoding once per batch, timed apart from the decoder.

Sampling follows AudioCraft's semantics: temperature, then ``top_p`` when it is
> 0, else ``top_k`` when > 0; classifier-free guidance mixes conditional and
unconditional logits with ``cfg_coef`` (1 = no guidance).
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from core_base.backends.model_cache import ModelSource, resolve_model_source, route_library_logs
from core_base.errors import PermanentError, SettingsError
from core_base.generation.batching import duration_bucket_s
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

if TYPE_CHECKING:
    import torch

    from core_base.generation.spec import ServiceSpec
    from core_base.settings import GenerationSettings

logger = logging.getLogger(__name__)

BACKEND = "transformers"

# AudioCraft continues 30 s windows every 18 s: 12 s of context per window.
DEFAULT_STRIDE_FRACTION = 18.0 / 30.0


# --- sampling ----------------------------------------------------------------------


@dataclass(frozen=True)
class _RowParams:
    """Resolved sampling knobs of one item."""

    top_k: int
    top_p: float
    temperature: float
    cfg_coef: float

    @classmethod
    def of(cls, item: GenerationItem) -> _RowParams:
        p = item.params
        return cls(
            top_k=DEFAULT_TOP_K if p.top_k is None else p.top_k,
            top_p=DEFAULT_TOP_P if p.top_p is None else p.top_p,
            temperature=DEFAULT_TEMPERATURE if p.temperature is None else p.temperature,
            cfg_coef=DEFAULT_CFG_COEF if p.cfg_coef is None else p.cfg_coef,
        )


class _RowSampler:
    """Samples one token per (item, codebook) row, each item from its own generator.

    Uniform draws come from CPU generators so that a seed means the same random
    stream on every device; the inverse-CDF draw is then computed row by row, so
    a row's token depends only on its own logits and its own stream.
    """

    def __init__(self, items: Sequence[GenerationItem], device: torch.device) -> None:
        import torch

        rows = [_RowParams.of(item) for item in items]
        self._generators = [torch.Generator().manual_seed(item.seed) for item in items]
        self._device = device
        self.cfg_coef = torch.tensor([r.cfg_coef for r in rows], device=device).view(-1, 1, 1)
        self.guided = any(r.cfg_coef != 1.0 for r in rows)
        self._temperature = torch.tensor([r.temperature for r in rows], device=device).view(
            -1, 1, 1
        )
        self._top_k = torch.tensor([r.top_k for r in rows], device=device).view(-1, 1, 1)
        self._top_p = torch.tensor([r.top_p for r in rows], device=device).view(-1, 1, 1)

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` (items, codebooks, vocab) float32 -> tokens (items, codebooks)."""
        import torch

        _, codebooks, vocab = logits.shape
        probs = torch.softmax(logits / self._temperature, dim=-1)
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        rank = torch.arange(vocab, device=logits.device).view(1, 1, -1)
        top_k = torch.where(self._top_k > 0, self._top_k, vocab)
        keep = rank < top_k
        # AudioCraft's nucleus: drop a token once the mass before it exceeds top_p.
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        keep = torch.where(self._top_p > 0, before <= self._top_p, keep)
        keep[..., 0] = True
        cdf = torch.cumsum(sorted_probs * keep, dim=-1)
        uniform = torch.stack(
            [torch.rand(codebooks, generator=g, dtype=torch.float64) for g in self._generators]
        ).to(device=logits.device, dtype=cdf.dtype)
        target = (uniform * cdf[..., -1]).unsqueeze(-1)
        choice = torch.searchsorted(cdf.contiguous(), target, right=True).clamp_(max=vocab - 1)
        tokens: torch.Tensor = order.gather(-1, choice).squeeze(-1)
        return tokens

    def guide(self, logits: torch.Tensor) -> torch.Tensor:
        """Classifier-free guidance: (2*items, ...) conditional+unconditional -> (items, ...)."""
        cond, uncond = logits.chunk(2, dim=0)
        return uncond + (cond - uncond) * self.cfg_coef


# --- conditioning --------------------------------------------------------------------


class _Conditioning:
    """Text conditioning of one batch, shaped for the decoder (rows doubled under CFG)."""

    def __init__(self, hidden: torch.Tensor, mask: torch.Tensor, *, prefix: bool) -> None:
        self.hidden = hidden
        self.mask = mask
        # MusicGen cross-attends to the text; MusicGen-Melody prepends it to the sequence.
        self.prefix = prefix

    def decoder_kwargs(self, step_input: torch.Tensor, first: bool, length: int) -> dict[str, Any]:
        """Arguments of ``model.decoder`` for a step whose sequence has ``length`` tokens."""
        import torch

        if not self.prefix:
            return {"encoder_hidden_states": self.hidden, "encoder_attention_mask": self.mask}
        rows = self.mask.shape[0]
        if first:
            ones = torch.ones(
                (rows, step_input.shape[-1]), dtype=self.mask.dtype, device=self.mask.device
            )
            return {
                "encoder_hidden_states": self.hidden,
                "encoder_attention_mask": self.mask,
                "attention_mask": ones,
            }
        ones = torch.ones((rows, length), dtype=self.mask.dtype, device=self.mask.device)
        return {"attention_mask": torch.cat([self.mask, ones], dim=1)}


# --- the adapter -------------------------------------------------------------------


@dataclass
class _Progress:
    callback: ProgressCallback | None
    total: int
    done: int = 0

    def step(self) -> None:
        self.done += 1
        if self.callback is not None:
            self.callback(self.done, self.total)


class TransformersMusicGenAdapter:
    """``facebook/musicgen-*`` (mono, stereo, melody text-only) through transformers."""

    backend = BACKEND
    # Batched matrix products round differently from one item alone.
    batch_invariant = False

    def __init__(
        self,
        model_id: str,
        *,
        cache_model_dir: Path,
        hub_cache_dir: Path | None = None,
        window_s: float = 30.0,
        stride_s: float | None = None,
        sample_rate: int = 32_000,
        channels: int = 1,
        device: str | None = None,
        dtype: str | None = None,
        variable: str = "MUSIC_GEN_MODEL",
    ) -> None:
        """``window_s``: the longest audio made in one pass (the model's native
        maximum); longer audio continues every ``stride_s`` from the last
        ``window_s - stride_s`` seconds. ``device``/``dtype`` override the choice
        made at load (CUDA with bf16 or fp16 when available, else CPU fp32)."""
        stride_s = window_s * DEFAULT_STRIDE_FRACTION if stride_s is None else stride_s
        if not 0 < stride_s < window_s:
            raise SettingsError(f"window stride must be in (0, {window_s}) s, got {stride_s}")
        self.model_id = model_id
        self.sample_rate = sample_rate
        self.channels = channels
        self.window_s = window_s
        self.stride_s = stride_s
        self._cache_model_dir = cache_model_dir
        self._hub_cache_dir = hub_cache_dir
        self._device_name = device
        self._dtype_name = dtype
        self._variable = variable
        self._model: Any = None
        self._processor: Any = None
        self._source: ModelSource | None = None
        self._melody = False
        self._cache_argument = "cache"  # the loaded release's name: see kv_cache_argument

    @classmethod
    def from_settings(
        cls, settings: GenerationSettings, spec: ServiceSpec
    ) -> TransformersMusicGenAdapter:
        """The adapter of a service: ``<PREFIX>MODEL``, the caches, the spec's window."""
        return cls(
            settings.model or spec.default_model,
            cache_model_dir=settings.cache_model_dir,
            hub_cache_dir=settings.transformers_cache,
            window_s=spec.native_max_duration_s,
            sample_rate=spec.sample_rate,
            channels=spec.channels,
            variable=f"{spec.env_prefix}MODEL",
        )

    @classmethod
    def from_model(
        cls, model: Any, processor: Any, model_id: str, *, window_s: float = 30.0
    ) -> TransformersMusicGenAdapter:
        """An adapter around an already loaded model (benchmarks, notebooks)."""
        adapter = cls(model_id, cache_model_dir=Path("."), window_s=window_s)
        adapter._attach(model, processor, ModelSource(Path("."), "in-memory"))
        return adapter

    # --- loading -----------------------------------------------------------------

    def load(self, progress: LoadProgressCallback | None = None) -> None:
        """Resolve, load and place the weights (blocking)."""

        def report(fraction: float, message: str) -> None:
            logger.info("loading %s: %s", self.model_id, message)
            if progress is not None:
                progress(fraction, message)

        with one_load_at_a_time(report):
            self._load(report)

    def _load(self, report: LoadProgressCallback) -> None:
        report(0.0, "resolving checkpoint")
        source = resolve_model_source(
            self.model_id,
            cache_model_dir=self._cache_model_dir,
            hub_cache_dir=self._hub_cache_dir,
            variable=self._variable,
        )
        report(0.1, f"loading processor from {source.path}")

        import torch
        import transformers

        route_library_logs()
        # transformers is only partly typed; its loaders are handled as Any.
        hf: Any = transformers
        device = torch.device(self._device_name or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = choose_dtype(device, self._dtype_name)
        config = hf.AutoConfig.from_pretrained(source.path)
        self._melody = config.model_type == "musicgen_melody" or "melody" in self.model_id.lower()
        model_class = (
            hf.MusicgenMelodyForConditionalGeneration
            if self._melody
            else hf.MusicgenForConditionalGeneration
        )
        processor = _load_text_processor(hf, source.path, melody=self._melody)
        report(0.2, f"loading weights ({dtype}, {device})")
        model = model_class.from_pretrained(source.path, dtype=dtype)
        report(0.8, "moving to device")
        model.to(device)
        # The codec is small next to the decoder; fp32 keeps its output clean.
        model.audio_encoder.to(torch.float32)
        self._attach(model, processor, source)
        report(1.0, "ready")

    def _attach(self, model: Any, processor: Any, source: ModelSource) -> None:
        model.eval()
        self._model = model
        self._processor = processor
        self._source = source
        self._melody = self._melody or model.config.model_type == "musicgen_melody"
        self.sample_rate = int(model.config.audio_encoder.sampling_rate)
        self.channels = int(model.config.decoder.audio_channels)
        self._cache_argument = kv_cache_argument(model.decoder)

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def _require_model(self) -> Any:
        if self._model is None:
            raise RuntimeError("load() must be called before generate()")
        return self._model

    # --- generation ----------------------------------------------------------------

    @property
    def frame_rate_hz(self) -> float:
        model = self._require_model()
        return float(model.config.audio_encoder.frame_rate)

    def generate(
        self, batch: Sequence[GenerationItem], progress: ProgressCallback | None = None
    ) -> list[GeneratedAudio]:
        """One audio per item, exactly ``frame_count(duration_s, sample_rate)`` frames.

        Items are decoded for their duration bucket's length (then trimmed), so
        an item gives the same audio alone or with any batch-mates; items of
        different buckets (or, on MusicGen-Melody, prompt token counts:
        :meth:`prompt_batch_key`) are decoded in separate passes.
        """
        import torch

        self._require_model()
        for item in batch:
            if not item.duration_s > 0:
                raise PermanentError(f"duration must be positive, got {item.duration_s}")
        groups: dict[tuple[int, Hashable], list[int]] = {}
        for index, item in enumerate(batch):
            key = (self.frames_for(item.duration_s), self.prompt_batch_key(item.prompt))
            groups.setdefault(key, []).append(index)
        tracker = _Progress(progress, sum(self.steps_for(n) for n, _ in groups))
        results: list[GeneratedAudio | None] = [None] * len(batch)
        with torch.inference_mode():
            for (n_frames, _), indices in groups.items():
                items = [batch[i] for i in indices]
                codes = self.generate_codes(items, n_frames, tracker.step)
                audio = self.decode_codes(codes)
                for row, index in enumerate(indices):
                    results[index] = self._finish(audio[row], batch[index].duration_s)
        return [r for r in results if r is not None]

    def prompt_batch_key(self, prompt: str) -> Hashable:
        """None for MusicGen: its text padding is masked in the encoder and in the
        cross-attention, so batch-mates' prompts do not matter. MusicGen-Melody
        puts the text before the audio in one sequence, where a longer batch-mate's
        padding shifts the audio's positions: only prompts of one token count go
        together there."""
        if not self._melody:
            return None
        self._require_model()
        return len(self._processor(text=[prompt])["input_ids"][0])

    def frames_for(self, duration_s: float) -> int:
        """Codec frames decoded for an item: its duration bucket, so batch-mates don't matter."""
        return math.ceil(duration_bucket_s(duration_s) * self.frame_rate_hz - 1e-6)

    def steps_for(self, n_frames: int) -> int:
        """Decoding steps for ``n_frames`` frames, windows and delay pattern included."""
        delay_steps = self._max_delay()
        return sum(n_new + delay_steps for _, n_new in self._windows(n_frames))

    def _windows(self, n_frames: int) -> list[tuple[int, int]]:
        """(context frames, new frames) of each pass."""
        window = max(1, int(self.window_s * self.frame_rate_hz))
        stride = max(1, min(window - 1, int(self.stride_s * self.frame_rate_hz)))
        passes = [(0, min(n_frames, window))]
        made = passes[0][1]
        while made < n_frames:
            new = min(n_frames - made, stride)
            passes.append((window - stride, new))
            made += new
        return passes

    def generate_codes(
        self,
        items: Sequence[GenerationItem],
        n_frames: int,
        on_step: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        """Audio codes (items, codebooks, n_frames) for the items' prompts and seeds."""
        import torch

        model = self._require_model()
        device = model.device
        sampler = _RowSampler(items, device)
        conditioning = self._condition([item.prompt for item in items], guided=sampler.guided)
        codes: torch.Tensor | None = None
        for context, n_new in self._windows(n_frames):
            prompt = None if codes is None or context == 0 else codes[..., -context:]
            new = self._decode_window(conditioning, sampler, prompt, n_new, on_step)
            codes = new if codes is None else torch.cat([codes, new], dim=-1)
        assert codes is not None
        return codes

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """EnCodec: codes (items, codebooks, frames) -> float audio (items, channels, samples)."""
        import torch

        model = self._require_model()
        scales = [None] * codes.shape[0]
        if self.channels == 1:
            return model.audio_encoder.decode(codes[None], audio_scales=scales).audio_values  # type: ignore[no-any-return]
        left = model.audio_encoder.decode(codes[None, :, ::2], audio_scales=scales).audio_values
        right = model.audio_encoder.decode(codes[None, :, 1::2], audio_scales=scales).audio_values
        return torch.cat([left, right], dim=1)

    def _finish(self, audio: torch.Tensor, duration_s: float) -> GeneratedAudio:
        samples = audio.float().clamp(-1.0, 1.0).cpu().numpy()
        n_samples = frame_count(duration_s, self.sample_rate)
        if samples.shape[1] < n_samples:
            samples = np.pad(samples, ((0, 0), (0, n_samples - samples.shape[1])))
        return GeneratedAudio(
            samples=np.ascontiguousarray(samples[:, :n_samples], dtype=np.float32),
            sample_rate=self.sample_rate,
        )

    def _max_delay(self) -> int:
        model = self._require_model()
        codebooks = int(model.decoder.num_codebooks)
        return (codebooks // self.channels) - 1

    def _delays(self) -> list[int]:
        model = self._require_model()
        # Stereo interleaves left/right codebooks; both of a pair share one delay.
        return [c // self.channels for c in range(int(model.decoder.num_codebooks))]

    def _condition(self, prompts: list[str], *, guided: bool) -> _Conditioning:
        import torch

        model = self._require_model()
        inputs = self._processor(text=prompts, padding=True, return_tensors="pt")
        input_ids = inputs["input_ids"].to(model.device)
        mask = inputs["attention_mask"].to(model.device)
        hidden = model.text_encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
        if getattr(model, "enc_to_dec_proj", None) is not None:
            hidden = model.enc_to_dec_proj(hidden)
        hidden = hidden * mask[..., None].to(hidden.dtype)
        if guided:
            # The null condition: no text at all, as in AudioCraft and transformers.
            hidden = torch.cat([hidden, torch.zeros_like(hidden)], dim=0)
            mask = torch.cat([mask, torch.zeros_like(mask)], dim=0)
        if not self._melody:
            return _Conditioning(hidden, mask, prefix=False)
        return self._melody_prefix(hidden, mask)

    def _melody_prefix(self, text: torch.Tensor, text_mask: torch.Tensor) -> _Conditioning:
        """Text-only MusicGen-Melody: the default "no melody" chroma, then the text."""
        import torch

        model = self._require_model()
        rows = text.shape[0]
        chroma = torch.zeros(
            (rows, 1, model.config.num_chroma), device=text.device, dtype=text.dtype
        )
        chroma[:, :, 0] = 1
        audio = chroma
        if model.config.num_chroma != model.decoder.config.hidden_size:
            audio = model.audio_enc_to_dec_proj(chroma)
        length = int(model.config.chroma_length)
        audio = audio.repeat(1, length, 1)
        audio_mask = torch.ones((rows, length), dtype=text_mask.dtype, device=text_mask.device)
        return _Conditioning(
            torch.cat([audio, text], dim=1), torch.cat([audio_mask, text_mask], dim=1), prefix=True
        )

    def _decode_window(
        self,
        conditioning: _Conditioning,
        sampler: _RowSampler,
        prompt: torch.Tensor | None,
        n_new: int,
        on_step: Callable[[], None] | None,
    ) -> torch.Tensor:
        """One pass of the delayed-codebook decoder: ``n_new`` frames after ``prompt``."""
        import torch

        model = self._require_model()
        device = model.device
        items = conditioning.mask.shape[0] // (2 if sampler.guided else 1)
        delays = self._delays()
        codebooks = len(delays)
        n_prompt = 0 if prompt is None else prompt.shape[-1]
        n_frames = n_prompt + n_new
        # Position 0 holds the start token; frame f of codebook c sits at 1 + f + delay[c].
        length = 1 + n_frames + max(delays)
        start = int(_start_token_id(model))
        sequence = torch.full((items, codebooks, length), start, dtype=torch.long, device=device)
        known = torch.ones((codebooks, length), dtype=torch.bool, device=device)
        for c, delay in enumerate(delays):
            known[c, 1 + delay : 1 + delay + n_frames] = False
            if prompt is not None:
                sequence[:, c, 1 + delay : 1 + delay + n_prompt] = prompt[:, c]
                known[c, 1 + delay : 1 + delay + n_prompt] = True
        first = 1 + n_prompt  # codebook 0 of the first new frame
        cache = None
        for position in range(first, length):
            is_first = cache is None
            step_input = (
                sequence[..., :position] if is_first else sequence[..., position - 1 : position]
            )
            if sampler.guided:
                step_input = torch.cat([step_input, step_input], dim=0)
            output = model.decoder(
                input_ids=step_input.reshape(-1, step_input.shape[-1]),
                use_cache=True,
                **{self._cache_argument: cache},
                **conditioning.decoder_kwargs(step_input, is_first, position),
            )
            cache = getattr(output, self._cache_argument)
            logits = output.logits[:, -1, :].float().view(-1, codebooks, output.logits.shape[-1])
            if sampler.guided:
                logits = sampler.guide(logits)
            tokens = sampler.sample(logits)
            column = sequence[:, :, position]
            sequence[:, :, position] = torch.where(known[:, position], column, tokens)
            if on_step is not None:
                on_step()
        index = torch.stack(
            [torch.arange(n_prompt, n_frames, device=device) + 1 + d for d in delays]
        )
        return sequence.gather(2, index.unsqueeze(0).expand(items, -1, -1))

    # --- facts -----------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """Reproducibility and licence facts for the task record and ``/health``."""
        facts: dict[str, Any] = {
            "backend": BACKEND,
            "model_id": self.model_id,
            "revision": self._source.revision if self._source else None,
            "device": str(self._model.device) if self._model is not None else self._device_name,
            "license": MODEL_WEIGHTS_LICENSE,
            "license_notice": CC_BY_NC_NOTICE,
            "sample_rate": self.sample_rate,
            "channels": self.channels,
            "window_s": self.window_s,
            "stride_s": self.stride_s,
            "sampling_defaults": dict(SAMPLING_DEFAULTS),
        }
        if self._model is not None:
            import torch
            import transformers

            facts["dtype"] = str(self._model.dtype).removeprefix("torch.")
            facts["melody"] = self._melody
            facts["torch_version"] = torch.__version__
            facts["transformers_version"] = transformers.__version__
        return facts


def _load_text_processor(hf: Any, path: Path, *, melody: bool) -> Any:
    """The processor, or for melody models without torchaudio its tokenizer alone.

    MusicGen-Melody's feature extractor (chroma of a melody) imports torchaudio,
    which has no CPU wheel for our torch; text-only generation needs the tokenizer.
    """
    try:
        return hf.AutoProcessor.from_pretrained(path)
    except (ImportError, OSError, ValueError):
        if not melody:
            raise
        logger.warning("melody feature extractor unavailable (torchaudio?): text-only generation")
        return hf.AutoTokenizer.from_pretrained(path)


def choose_dtype(device: torch.device, name: str | None = None) -> torch.dtype:
    """``name`` if given; else fp32 on a CPU, bf16 on a GPU that computes in it
    natively (Ampere on), fp16 on older GPUs (where torch would emulate bf16)."""
    import torch

    if name is not None:
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype):
            raise SettingsError(f"dtype: unknown torch dtype {name!r}")
        return dtype
    if device.type != "cuda":
        return torch.float32
    native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.bfloat16 if native_bf16 else torch.float16


def _start_token_id(model: Any) -> int:
    for value in (
        model.generation_config.decoder_start_token_id,
        getattr(model.config, "decoder_start_token_id", None),
        model.config.decoder.bos_token_id,
    ):
        if value is not None:
            return int(value)
    return int(model.config.decoder.vocab_size)


def kv_cache_argument(decoder: Any) -> str:
    """The name of the decoder's key/value cache, as argument and output field:
    transformers 5 renamed ``past_key_values`` to ``cache`` (the old name warns, and
    goes in 5.40); the 4.x releases this backend supports know only the old one."""
    parameters = inspect.signature(decoder.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"
