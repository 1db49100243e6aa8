"""Audio encoding (wav, mp3, flac) and the ``generate`` command."""
