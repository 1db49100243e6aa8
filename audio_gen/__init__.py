"""AudioGen: sound effects from text (Meta's AudioGen, 16 kHz mono)."""
