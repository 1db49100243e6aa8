"""Which layers a prompt calls for: keywords to layer functions, and the defaults
when no keyword matches."""

from __future__ import annotations

import numpy as np

from core_base.backends.synth.context import LayerFn
from core_base.backends.synth.music import bass, drums, melody, pad
from core_base.backends.synth.sounds import (
    birds,
    cat,
    crowd,
    dog,
    engine,
    fire,
    pings,
    rain,
    room_tone,
    siren,
    steps,
    texture,
    thunder,
    water,
    wind,
)


def plan(words: frozenset[str], *, music: bool, style: np.random.Generator) -> list[LayerFn]:
    """The layer functions to render, in order (the order fixes the random streams)."""
    chosen = [fn for keywords, fn in KEYWORD_LAYERS if words & keywords]
    has_music = any(fn in MUSIC_LAYERS for fn in chosen)
    if music and not has_music:
        # A music service always plays music; the prompt hash decides whether it grooves.
        chosen += [melody, pad] + ([drums] if style.random() < 0.5 else [])
    elif music and drums in chosen and not (set(chosen) & {melody, pad, bass}):
        chosen += [bass]
    if not chosen:
        chosen = [texture, pings]
    if not music:
        chosen.append(room_tone)
    return list(dict.fromkeys(chosen))


MUSIC_LAYERS = frozenset({melody, pad, bass, drums})
KEYWORD_LAYERS: tuple[tuple[frozenset[str], LayerFn], ...] = (
    (
        frozenset(
            {"rain", "raining", "rainy", "rainfall", "drizzle", "downpour", "shower", "storm"}
        ),
        rain,
    ),
    (
        frozenset(
            {
                "water",
                "stream",
                "river",
                "brook",
                "creek",
                "ocean",
                "sea",
                "waves",
                "wave",
                "waterfall",
                "splash",
                "bubbling",
                "bubbles",
                "fountain",
                "beach",
                "surf",
            }
        ),
        water,
    ),
    (
        frozenset({"wind", "windy", "breeze", "gust", "gusts", "howling", "blizzard", "storm"}),
        wind,
    ),
    (
        frozenset({"fire", "crackling", "crackle", "campfire", "fireplace", "burning", "flames"}),
        fire,
    ),
    (frozenset({"thunder", "thunderstorm", "rumble", "rumbling"}), thunder),
    (frozenset({"dog", "dogs", "bark", "barks", "barking", "puppy", "woof"}), dog),
    (frozenset({"cat", "cats", "meow", "meows", "meowing", "kitten", "kitty"}), cat),
    (
        frozenset(
            {
                "bird",
                "birds",
                "chirp",
                "chirps",
                "chirping",
                "tweet",
                "tweeting",
                "songbird",
                "birdsong",
                "sparrow",
                "robin",
            }
        ),
        birds,
    ),
    (
        frozenset(
            {
                "engine",
                "car",
                "cars",
                "motor",
                "traffic",
                "truck",
                "motorcycle",
                "idling",
                "machine",
                "vehicle",
            }
        ),
        engine,
    ),
    (frozenset({"siren", "sirens", "alarm", "ambulance", "police"}), siren),
    (
        frozenset(
            {
                "crowd",
                "people",
                "talking",
                "chatter",
                "applause",
                "clapping",
                "cafe",
                "restaurant",
                "market",
            }
        ),
        crowd,
    ),
    (
        frozenset({"footsteps", "footstep", "steps", "walking", "running", "knock", "knocking"}),
        steps,
    ),
    (
        frozenset(
            {
                "drum",
                "drums",
                "beat",
                "beats",
                "percussion",
                "kick",
                "snare",
                "hihat",
                "techno",
                "house",
                "hip",
                "hop",
                "trap",
                "rock",
                "funk",
                "groove",
                "dance",
                "edm",
                "dnb",
            }
        ),
        drums,
    ),
    (
        frozenset(
            {
                "melody",
                "piano",
                "guitar",
                "synth",
                "synthesizer",
                "keys",
                "music",
                "song",
                "tune",
                "jazz",
                "classical",
                "lofi",
                "arpeggio",
                "bell",
                "bells",
                "marimba",
                "harp",
                "xylophone",
                "chiptune",
                "violin",
                "flute",
            }
        ),
        melody,
    ),
    (
        frozenset(
            {
                "pad",
                "strings",
                "orchestra",
                "orchestral",
                "ambient",
                "cinematic",
                "choir",
                "chords",
                "cello",
                "lofi",
            }
        ),
        pad,
    ),
    (frozenset({"bass", "bassline", "808"}), bass),
)
