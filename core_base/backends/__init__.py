"""Model adapters: ``synth`` (DSP, no weights), ``transformers``, ``audiocraft``."""
