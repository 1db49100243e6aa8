"""Shared framework for the marketplace's AI services.

Settings, the broker/KV/repository/storage ports and their adapters, the generic
generation service (internal API + worker), the base App API pieces, auth,
webhooks, health and metrics. ``audio_gen`` and ``music_gen`` are thin layers on
top of this package.
"""
