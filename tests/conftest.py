"""Shared fixtures: real infrastructure in ``tests.support.infra``; helpers for
running the service's processes in ``tests.support.processes``."""

pytest_plugins = ["tests.support.infra"]
