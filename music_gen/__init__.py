"""MusicGen: music from text (Meta's MusicGen, 32 kHz)."""
