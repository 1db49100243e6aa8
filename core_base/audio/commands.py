"""``audiocraft-service generate``: one audio file from a prompt, locally, with a
progress bar. Same settings, backends and encoder as the workers."""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from tqdm import tqdm

from core_base.audio.encoding import encode, probe
from core_base.contracts import SamplingParams
from core_base.domain import AudioFormat, Kind
from core_base.errors import InvalidInputError, SettingsError
from core_base.files import write_atomically
from core_base.generation.models import GenerationItem, ModelAdapter
from core_base.generation.spec import ServiceSpec
from core_base.log_format import say
from core_base.services import service_spec
from core_base.settings import GenerationSettings, load_settings

EXIT_INVALID_INPUT = 2
EXIT_WRITE_FAILED = 1
SEED_LIMIT = 2**32  # seeds are 0 .. 2**32-1, as in the API


def register(subparsers: Any) -> None:
    """Add the ``generate`` subcommand."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "generate",
        help="generate one audio file locally from a prompt",
        description=(
            "Generate one audio file from a prompt with the configured backend "
            "(AUDIO_GEN_BACKEND / MUSIC_GEN_BACKEND) and write it to a file."
        ),
    )
    parser.add_argument("prompt", help='what to hear, e.g. "a dog barking"')
    parser.add_argument(
        "--kind", choices=[k.value for k in Kind], default=Kind.SOUND.value, help="default: sound"
    )
    parser.add_argument("--duration", type=float, default=5.0, help="seconds (default 5)")
    parser.add_argument(
        "--format",
        choices=[f.value for f in AudioFormat],
        default=None,
        help="default: from the output file's extension, else wav",
    )
    parser.add_argument("--seed", type=int, default=None, help="default: a random seed (printed)")
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        help="default: <kind>-<seed>.<format>; - writes the audio to standard output",
    )
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--cfg-coef", type=float, default=None)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Generate, encode and write the file; exit code 2 on invalid input."""
    spec = service_spec(Kind(args.kind))
    settings = load_settings(spec.settings_class)
    try:
        item, fmt = _validated_item(args, settings)
        output: Path = args.output or Path(f"{spec.kind.value}-{item.seed}.{fmt.value}")
        _check_output(output)
    except InvalidInputError as exc:
        say(f"audiocraft-service generate: error: {exc}")
        return EXIT_INVALID_INPUT

    if args.quiet:
        _quiet_library_bars()
    adapter = build_adapter(settings, spec)
    with _bar("loading", total=100, unit="%", quiet=args.quiet) as bar:
        adapter.load(lambda fraction, message: _advance(bar, round(fraction * 100), message))
    with _bar("generating", total=None, unit="step", quiet=args.quiet, leave=True) as bar:
        audio = adapter.generate([item], lambda done, total: _advance(bar, done, total=total))[0]

    data = encode(audio, fmt)
    try:
        _write_output(output, data)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        say(f"audiocraft-service generate: error: output: {output}: {reason}")
        return EXIT_WRITE_FAILED
    info = probe(data, fmt)
    # On stderr, as the bars: stdout may be the audio itself.
    where = "standard output" if _is_stdout(output) else str(output)
    say(
        f"wrote {where} ({audio.duration_s:.2f} s, {info.sample_rate} Hz, "
        f"{info.channels} ch, {len(data)} bytes) seed={item.seed} model={adapter.model_id}",
        level=logging.INFO,
    )
    return 0


def _is_stdout(output: Path) -> bool:
    return str(output) == "-"


def _check_output(output: Path) -> None:
    """Before the model loads: a path that cannot take the file is said now,
    not after the generation."""
    if _is_stdout(output):
        return
    if output.is_dir():
        raise InvalidInputError("output", f"{output} is a directory")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise InvalidInputError("output", f"cannot create {output.parent}: {reason}") from None
    if not os.access(output.parent, os.W_OK):
        raise InvalidInputError("output", f"{output.parent} is not writable")


def _write_output(output: Path, data: bytes) -> None:
    """A file is written whole or not at all (a full disk leaves no truncated
    file, nor destroys one already there); a device, a pipe or a link to one
    (/dev/stdout) is written through, never replaced."""
    if _is_stdout(output):
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    elif output.is_symlink() or (output.exists() and not output.is_file()):
        output.write_bytes(data)
    else:
        write_atomically(output, data)


def build_adapter(settings: GenerationSettings, spec: ServiceSpec) -> ModelAdapter:
    """The adapter of the configured backend; a backend the service lacks, or whose
    optional packages are missing, is a settings error naming ``<PREFIX>BACKEND``."""
    variable = f"{spec.env_prefix}BACKEND"
    factory = spec.backends.get(settings.backend.value)
    if factory is None:
        available = ", ".join(sorted(spec.backends))
        raise SettingsError(
            f"{variable}: {spec.title} has no {settings.backend.value!r} backend; "
            f"use one of {available}"
        )
    try:
        return factory(settings, spec)
    except ModuleNotFoundError as exc:
        raise SettingsError(
            f"{variable}: backend {settings.backend.value!r} is not installed here ({exc}); "
            "install the matching extra or choose another backend"
        ) from None


def _validated_item(
    args: argparse.Namespace, settings: GenerationSettings
) -> tuple[GenerationItem, AudioFormat]:
    prompt = " ".join(str(args.prompt).split())
    if not prompt:
        raise InvalidInputError("prompt", "must not be blank")
    if len(prompt) > settings.max_prompt_len:
        raise InvalidInputError(
            "prompt",
            f"{len(prompt)} characters; at most {settings.max_prompt_len} (MAX_PROMPT_LEN)",
        )
    duration_s = float(args.duration)
    if not 0 < duration_s <= settings.max_duration:
        raise InvalidInputError(
            "duration",
            f"{duration_s:g} s; must be > 0 and <= {settings.max_duration:g} (MAX_DURATION)",
        )
    seed = secrets.randbelow(SEED_LIMIT) if args.seed is None else int(args.seed)
    if not 0 <= seed < SEED_LIMIT:
        raise InvalidInputError("seed", f"{seed}; must be between 0 and {SEED_LIMIT - 1}")
    try:
        params = SamplingParams(
            top_k=args.top_k, top_p=args.top_p, temperature=args.temperature, cfg_coef=args.cfg_coef
        )
    except ValidationError as exc:
        error = exc.errors()[0]
        name = str(error["loc"][0]) if error.get("loc") else "params"
        raise InvalidInputError(name.replace("_", "-"), str(error["msg"])) from None
    return GenerationItem(prompt, duration_s, seed, params), _format(args)


def _format(args: argparse.Namespace) -> AudioFormat:
    """``--format``, else the output file's extension, else wav. An extension that
    names another format (or none of ours) is refused: a file named x.ogg holding
    WAV data plays nowhere that trusts the name."""
    suffix = args.output.suffix.lower().lstrip(".") if args.output is not None else ""
    known = {f.value for f in AudioFormat}
    if args.format is not None:
        fmt = AudioFormat(args.format)
        if suffix in known and suffix != fmt.value:
            raise InvalidInputError("output", f"{args.output} is not named .{fmt.value}")
        return fmt
    if suffix in known:
        return AudioFormat(suffix)
    if suffix:
        names = ", ".join(f".{name}" for name in sorted(known))
        raise InvalidInputError(
            "output", f"{args.output}: .{suffix} is not one of {names}; or pass --format"
        )
    return AudioFormat.WAV


def _quiet_library_bars() -> None:
    """No progress bars of the model libraries either: transformers draws one as it
    loads weights, huggingface_hub one per file it fetches. Both read the hub's
    switch when imported (the backends import them as they load); one imported
    already is told directly."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()


def _bar(
    description: str, *, total: int | None, unit: str, quiet: bool, leave: bool = False
) -> tqdm[Any]:
    return tqdm(
        total=total, desc=description, unit=unit, disable=quiet, leave=leave, file=sys.stderr
    )


def _advance(bar: tqdm[Any], done: int, message: str = "", *, total: int | None = None) -> None:
    if total is not None and bar.total != total:
        bar.total = total
        bar.refresh()
    if message:
        bar.set_postfix_str(message, refresh=False)
    if done > bar.n:
        bar.update(done - bar.n)
