"""Model benchmark: decoding cost per step and audio throughput vs batch size.

Builds a MusicGen with ``facebook/musicgen-small`` shapes (T5-base text
encoder, 24-layer d=1024 decoder, the 32 kHz EnCodec; ``--layers 48 --hidden
1536`` gives the medium models' decoder) and random weights, and
runs the service's own transformers adapter on it (classifier-free guidance on,
AudioCraft's sampling defaults). Random weights cost the same per step as real
ones, so the timings stand for the real model. EnCodec decoding is timed apart.

    python bench/models.py                      # CPU, 1 s of audio, batches 1,4,8,16
    python bench/models.py --device cuda --duration-s 10

Writes (or replaces) its section of ``bench/RESULTS.md``, one per device type and
decoder shape. Not a test: nothing
here asserts on time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import cpu_model  # noqa: E402
from core_base.backends.tiny import random_musicgen  # noqa: E402
from core_base.generation.models import GenerationItem  # noqa: E402

RESULTS = ROOT / "bench" / "RESULTS.md"
# Decoder shapes of the released checkpoints (layers, width) that runs are named by.
KNOWN_SHAPES = {
    (24, 1024): "musicgen-small",
    (48, 1536): "musicgen-medium / audiogen-medium",
    (48, 2048): "musicgen-large",
}


def section_markers(device: str, layers: int, hidden: int) -> tuple[str, str]:
    """One section per device type and shape, so CPU and GPU tables stand side by side."""
    key = (
        "bench/models.py"
        if device == "cpu" and (layers, hidden) == (24, 1024)
        else (f"bench/models.py {device.split(':')[0]} {layers}x{hidden}")
    )
    return f"<!-- {key}: start -->", f"<!-- {key}: end -->"


@dataclass(frozen=True)
class Row:
    batch: int
    steps: int
    step_ms: float  # median of steps 2..n: the steady decoding step
    decoder_s: float  # everything before EnCodec, text encoding and prefill included
    codec_s: float
    audio_s: float
    peak_gib: (
        float | None
    )  # the most GPU memory tensors took in the run, weights included; None on a CPU

    @property
    def throughput(self) -> float:
        """Audio seconds per compute second (decoder + codec)."""
        return self.audio_s / (self.decoder_s + self.codec_s)


def build_small_shaped_model(layers: int, hidden: int, dtype: str, device: str) -> Any:
    """A random MusicGen of musicgen-small's shapes, without saving it anywhere."""
    import torch
    import transformers

    # transformers is only partly typed; its classes are handled as Any.
    hf: Any = transformers

    text = hf.T5Config(
        d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12, vocab_size=32128
    )
    codec = hf.EncodecConfig(
        sampling_rate=32_000,
        upsampling_ratios=[8, 5, 4, 4],
        target_bandwidths=[2.2],
        codebook_size=2048,
        num_filters=64,
        hidden_size=128,
        codebook_dim=128,
        num_lstm_layers=2,
        num_residual_layers=1,
        normalize=False,
        use_causal_conv=False,
        chunk_length_s=None,
        overlap=None,
    )
    decoder = hf.MusicgenDecoderConfig(
        vocab_size=2048,
        num_hidden_layers=layers,
        hidden_size=hidden,
        ffn_dim=4 * hidden,
        num_attention_heads=hidden // 64,
        num_codebooks=4,
        dropout=0.0,
    )
    model = random_musicgen(text, codec, decoder, seed=0)
    model.generation_config.decoder_start_token_id = 2048
    model.to(device=device, dtype=getattr(torch, dtype))
    model.audio_encoder.to(torch.float32)
    processor = hf.MusicgenProcessor(
        feature_extractor=hf.EncodecFeatureExtractor(feature_size=1, sampling_rate=32_000),
        tokenizer=hf.ByT5Tokenizer(),
    )
    return model, processor


def measure(adapter: Any, batch: int, duration_s: float, device: str) -> Row:
    import torch

    cuda = device.startswith("cuda")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    items = [
        GenerationItem(f"prompt number {i}: upbeat electronic music", duration_s, seed=i)
        for i in range(batch)
    ]
    frames = round(duration_s * adapter.frame_rate_hz)
    stamps: list[float] = []

    def on_step() -> None:
        sync()
        stamps.append(time.perf_counter())

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        sync()
        started = time.perf_counter()
        codes = adapter.generate_codes(items, frames, on_step)
        sync()
        decoded = time.perf_counter()
        adapter.decode_codes(codes)
        sync()
        finished = time.perf_counter()
    intervals = [b - a for a, b in itertools.pairwise(stamps)]
    return Row(
        batch=batch,
        steps=adapter.steps_for(frames),
        step_ms=1000.0 * statistics.median(intervals) if intervals else float("nan"),
        decoder_s=decoded - started,
        codec_s=finished - decoded,
        audio_s=batch * duration_s,
        peak_gib=torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
    )


def machine(device: str) -> str:
    import torch

    parts = [
        f"CPU {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    ]
    if device.startswith("cuda"):
        parts.append(f"GPU {torch.cuda.get_device_name(torch.device(device))}")
    try:
        load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
        parts.append(f"load average at start {load}")
    except OSError:
        pass
    return "; ".join(parts)


def render(
    rows: list[Row], args: argparse.Namespace, facts: str, out_of_memory_at: int | None = None
) -> str:
    base = rows[0]
    start, end = section_markers(args.device, args.layers, args.hidden)
    shape = KNOWN_SHAPES.get((args.layers, args.hidden), "custom")
    on_gpu = args.device.startswith("cuda")
    lines = [
        start,
        "## Model backend: decoding cost vs batch size (`bench/models.py`"
        f", {'GPU' if on_gpu else 'CPU'}, {shape} shape)",
        "",
        f"- Date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Machine: {facts}",
        f"- Model: random weights, {shape} decoder shape ({args.layers} layers, d={args.hidden}),"
        " T5-base encoder, 32 kHz EnCodec; transformers backend, classifier-free guidance on"
        f" (2 decoder rows per item), device `{args.device}`, dtype `{args.dtype}`",
        f"- Audio per item: {args.duration_s:g} s ({rows[0].steps} decoding steps);"
        " one run per batch size after a warm-up, so expect noise of ±10-20 %",
        f"- Command: `python bench/models.py {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        "Steady ms/step is the median decoding step after the first (which also encodes"
        " the text); decoder s is the whole token generation; throughput counts decoder"
        " and EnCodec.",
        "",
        "| batch | ms / step | decoder s | EnCodec s | audio s / compute s | per-item speed-up vs batch 1 |"
        + (" peak GPU memory GiB |" if on_gpu else ""),
        "|---:|---:|---:|---:|---:|---:|" + ("---:|" if on_gpu else ""),
    ]
    for row in rows:
        memory = f" {row.peak_gib:.2f} |" if row.peak_gib is not None else ""
        lines.append(
            f"| {row.batch} | {row.step_ms:.1f} | {row.decoder_s:.2f} | {row.codec_s:.2f}"
            f" | {row.throughput:.3f} | {row.throughput / base.throughput:.1f}x |{memory}"
        )
    if out_of_memory_at is not None:
        lines += ["", f"Batch {out_of_memory_at} ran out of GPU memory; larger ones were skipped."]
    lines += [end, ""]
    return "\n".join(lines)


def write_section(section: str, markers: tuple[str, str], path: Path) -> None:
    text = path.read_text() if path.exists() else "# Benchmark results\n\n"
    start, end = markers
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end) + r"\n?", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--dtype", default=None, help="default: the service's choice for the device"
    )
    parser.add_argument("--duration-s", type=float, default=1.0)
    parser.add_argument("--batch-sizes", default="1,4,8,16")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)

    import torch

    from core_base.backends.transformers_backend import TransformersMusicGenAdapter, choose_dtype

    # The service's own choice unless told otherwise.
    args.dtype = args.dtype or str(choose_dtype(torch.device(args.device))).removeprefix("torch.")

    if args.threads:
        torch.set_num_threads(args.threads)
    facts = machine(args.device)
    print(f"building model ({facts})", flush=True)
    model, processor = build_small_shaped_model(args.layers, args.hidden, args.dtype, args.device)
    adapter = TransformersMusicGenAdapter.from_model(
        model, processor, "random/musicgen-small-shaped"
    )
    measure(adapter, 1, 0.1, args.device)  # warm-up: allocator, kernels
    rows = []
    out_of_memory_at: int | None = None
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        try:
            row = measure(adapter, batch, args.duration_s, args.device)
        except torch.cuda.OutOfMemoryError:
            # The rows so far still stand; a larger batch would not fit either.
            out_of_memory_at = batch
            print(f"batch {batch:>2}: out of GPU memory; larger batches skipped", flush=True)
            torch.cuda.empty_cache()
            break
        rows.append(row)
        memory = f", peak {row.peak_gib:.2f} GiB" if row.peak_gib is not None else ""
        print(
            f"batch {row.batch:>2}: {row.step_ms:7.1f} ms/step, decoder {row.decoder_s:6.2f} s,"
            f" EnCodec {row.codec_s:5.2f} s, {row.throughput:.3f} audio s / s{memory}",
            flush=True,
        )
    if not rows:
        print("no batch size fitted; nothing to record", file=sys.stderr)
        return 1
    section = render(rows, args, facts, out_of_memory_at)
    print(section)
    if not args.no_write:
        write_section(section, section_markers(args.device, args.layers, args.hidden), args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
