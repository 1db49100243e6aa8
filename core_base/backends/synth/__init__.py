"""The ``synth`` backend: a deterministic DSP sound generator. Not a model.

It exists so that ``dev``, the tests and the orchestration benchmarks run the
whole service without weights or a GPU, on audio that is real, audible and
depends on the prompt in a recognisable way:

* keywords pick layers: rain / water / wind / fire / thunder become filtered
  noise textures; dog / cat / bird become barks, meows and chirps; engine,
  siren, crowd, footsteps have their own sketches; drum / beat become a drum
  pattern at a tempo; piano / guitar / synth / strings / bass / melody become
  notes in a scale;
* the prompt alone (its hash) chooses the character: scale, root, tempo,
  timbre, noise colour; the seed and sampling params choose the details
  (which notes, when the dog barks), so the same prompt + seed + params always
  gives the same samples (for one :data:`SYNTH_VERSION`);
* a music service leans on tones (it always has a melody or chords), a sound
  service on noise (a prompt without known words becomes a coloured texture).

``temperature`` widens melodic steps and timing jitter; every param is part of
the seed. Generation advances in steps of 1/50 s of audio, like the real
models; ``step_delay_s`` paces the steps to emulate a GPU whose decoding cost
does not grow with the batch size.

Modules, one job each:

* :mod:`.adapter`: the ``ModelAdapter`` (steps, pacing, progress);
* :mod:`.render`: one item to samples (seeding, mixing, the master level);
* :mod:`.plan`: which layers a prompt's words call for;
* :mod:`.context`: what a layer is given and what it returns;
* :mod:`.music`: musical style, melody, chords, bass and drums;
* :mod:`.sounds`: sound textures and events (rain, dog, engine...);
* :mod:`.instruments`: the timbres notes are played with;
* :mod:`.dsp`: signal primitives (noise, envelopes, tones, chirps...).
"""

from core_base.backends.synth.adapter import (
    DEFAULT_PROGRESS_EVERY_STEPS,
    STEPS_PER_SECOND,
    SynthAdapter,
)
from core_base.backends.synth.render import EDGE_FADE_S, MASTER_PEAK, SYNTH_VERSION, synthesize

__all__ = [
    "DEFAULT_PROGRESS_EVERY_STEPS",
    "EDGE_FADE_S",
    "MASTER_PEAK",
    "STEPS_PER_SECOND",
    "SYNTH_VERSION",
    "SynthAdapter",
    "synthesize",
]
