"""The generic generation service: internal API + worker, shared by every AI service."""
