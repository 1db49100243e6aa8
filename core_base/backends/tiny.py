"""Tiny randomly initialised MusicGen models of the real architecture.

Model weights cannot be downloaded on development machines (SPEC §5), so tests
and benchmarks build a miniature MusicGen (T5 text encoder, 32 kHz EnCodec with
2048-code codebooks, delayed-codebook decoder), save it with ``save_pretrained``
and load it back through the same code path as a real checkpoint. Its audio is
noise; its shapes, token layout and loading are those of ``facebook/musicgen-*``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# The real MusicGen codec: 32 kHz, hop 640 (50 frames/s), 2048 codes per codebook.
# Keeping codebook_size at 2048 matters: EnCodec derives the number of codebooks
# from bandwidth and codebook size (2.2 kbps / (50 * 11 bits) = 4 codebooks).
SAMPLE_RATE_HZ = 32_000
UPSAMPLING_RATIOS = (8, 5, 4, 4)
CODEBOOK_SIZE = 2048
TARGET_BANDWIDTH_KBPS = 2.2
MONO_CODEBOOKS = 4
# ByT5Tokenizer needs no vocabulary file; its 384 ids bound the T5 vocabulary.
BYT5_VOCAB_SIZE = 384


def random_musicgen(
    text_config: Any, audio_config: Any, decoder_config: Any, *, seed: int, melody: bool = False
) -> Any:
    """A randomly initialised ``MusicgenForConditionalGeneration`` of the given
    parts (T5, EnCodec and decoder configs), in eval mode, whose codec decodes
    different codes to different audio."""
    import torch
    import transformers

    hf: Any = transformers
    config_class = hf.MusicgenMelodyConfig if melody else hf.MusicgenConfig
    config = config_class(
        text_encoder=text_config, audio_encoder=audio_config, decoder=decoder_config
    )
    config.decoder_start_token_id = CODEBOOK_SIZE
    config.pad_token_id = CODEBOOK_SIZE
    torch.manual_seed(seed)
    model_class = (
        hf.MusicgenMelodyForConditionalGeneration if melody else hf.MusicgenForConditionalGeneration
    )
    model = model_class(config)
    model.eval()
    # EnCodec's codebooks are buffers that start at zero (they are learnt by
    # k-means); left so, every code would decode to the same audio.
    with torch.no_grad():
        for layer in model.audio_encoder.quantizer.layers:
            layer.codebook.embed.normal_()
            layer.codebook.embed_avg.copy_(layer.codebook.embed)
            layer.codebook.cluster_size.fill_(1.0)
    return model


def build_tiny_musicgen(
    directory: Path, *, stereo: bool = False, melody: bool = False, seed: int = 0
) -> Path:
    """Build, save and return ``directory``: a tiny random MusicGen checkpoint.

    ``AutoProcessor.from_pretrained(directory)`` and
    ``MusicgenForConditionalGeneration.from_pretrained(directory)`` load it.
    Stereo models interleave left/right codebooks (8 in all), like
    ``facebook/musicgen-stereo-*``. ``melody`` builds a MusicGen-Melody (the text
    goes before the audio in the decoder's sequence), saved with its tokenizer
    alone: its chroma feature extractor needs torchaudio, and the service
    generates from text only. The same ``seed`` gives the same weights.
    """
    import transformers

    # transformers is only partly typed; its classes are handled as Any.
    hf: Any = transformers

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    channels = 2 if stereo else 1

    text_config = hf.T5Config(
        vocab_size=BYT5_VOCAB_SIZE,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
    )
    audio_config = hf.EncodecConfig(
        sampling_rate=SAMPLE_RATE_HZ,
        audio_channels=1,
        upsampling_ratios=list(UPSAMPLING_RATIOS),
        target_bandwidths=[TARGET_BANDWIDTH_KBPS],
        codebook_size=CODEBOOK_SIZE,
        codebook_dim=16,
        hidden_size=16,
        num_filters=4,
        num_residual_layers=1,
        num_lstm_layers=1,
        normalize=False,
        chunk_length_s=None,
        overlap=None,
    )
    decoder_config_class = hf.MusicgenMelodyDecoderConfig if melody else hf.MusicgenDecoderConfig
    decoder_config = decoder_config_class(
        vocab_size=CODEBOOK_SIZE,
        max_position_embeddings=4096,
        num_hidden_layers=2,
        ffn_dim=64,
        num_attention_heads=4,
        hidden_size=32,
        num_codebooks=MONO_CODEBOOKS * channels,
        audio_channels=channels,
        dropout=0.0,
    )
    model = random_musicgen(text_config, audio_config, decoder_config, seed=seed, melody=melody)
    # The published checkpoints ship AudioCraft's sampling defaults; mirror them.
    model.generation_config = hf.GenerationConfig(
        decoder_start_token_id=CODEBOOK_SIZE,
        pad_token_id=CODEBOOK_SIZE,
        bos_token_id=CODEBOOK_SIZE,
        do_sample=True,
        guidance_scale=3.0,
        top_k=250,
        max_length=1500,
    )
    model.save_pretrained(directory)

    if melody:
        hf.ByT5Tokenizer().save_pretrained(directory)
        return directory
    processor = hf.MusicgenProcessor(
        feature_extractor=hf.EncodecFeatureExtractor(
            feature_size=channels, sampling_rate=SAMPLE_RATE_HZ, padding_value=0.0
        ),
        tokenizer=hf.ByT5Tokenizer(),
    )
    processor.save_pretrained(directory)
    return directory
