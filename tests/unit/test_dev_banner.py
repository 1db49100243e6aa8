"""The start-up banner of ``audiocraft-service dev``: its curls must work as printed;
and the warning when dev is reachable from elsewhere with its published secrets."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pytest

from core_base.dev import (
    DEFAULT_DEV_INTERNAL_TOKEN,
    DEFAULT_DEV_TOKEN,
    DEFAULT_DEV_WEBHOOK_SECRET,
    DevOptions,
    backends_line,
    print_banner,
    warn_if_exposed,
)
from core_base.settings import AppSettings


def banner(capsys: pytest.CaptureFixture[str], marketplace_token: str) -> str:
    values: dict[str, Any] = {
        "_env_file": None,
        "marketplace_token": marketplace_token,
        "internal_token": "dev-internal-token",
        "webhook_secret": "dev-webhook-secret",
    }
    settings = AppSettings(**values)
    options = DevOptions(
        host="0.0.0.0", data_dir=Path("var/dev"), marketplace_token=marketplace_token
    )
    print_banner(settings, options, {"AudioGen": "synth", "MusicGen": "synth"})
    return capsys.readouterr().out


def bearer_tokens(text: str) -> set[str]:
    return set(re.findall(r"Authorization: Bearer ([^']*)'", text))


def test_one_token_is_printed_and_used(capsys: pytest.CaptureFixture[str]) -> None:
    text = banner(capsys, "dev-marketplace-token")
    assert "marketplace token: dev-marketplace-token" in text
    # The plain secret as a Standard Webhooks library takes it: whsec_ + base64.
    assert "webhook secret: whsec_ZGV2LXdlYmhvb2stc2VjcmV0 (Standard Webhooks" in text
    assert bearer_tokens(text) == {"dev-marketplace-token"}
    assert "http://127.0.0.1:8007/v1/call" in text


def test_a_token_list_puts_one_valid_token_in_the_curls(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """MARKETPLACE_TOKEN="tok1, tok2,," (rotation) is a list: a curl with the whole
    text as its token would be refused."""
    text = banner(capsys, "first-token-1, second-token-2,,")
    assert bearer_tokens(text) == {"first-token-1"}
    assert "marketplace tokens: first-token-1, second-token-2" in text


def test_the_backends_in_use_are_named() -> None:
    synth = backends_line({"AudioGen": "synth", "MusicGen": "synth"})
    assert synth.startswith("backends: AudioGen synth, MusicGen synth (deterministic DSP")
    models = backends_line({"AudioGen": "audiocraft", "MusicGen": "transformers"})
    assert models.startswith("backends: AudioGen audiocraft, MusicGen transformers (")
    assert "DSP" not in models


def dev_settings(**overrides: str) -> AppSettings:
    values: dict[str, Any] = {
        "_env_file": None,
        "marketplace_token": DEFAULT_DEV_TOKEN,
        "internal_token": DEFAULT_DEV_INTERNAL_TOKEN,
        "webhook_secret": DEFAULT_DEV_WEBHOOK_SECRET,
        **overrides,
    }
    return AppSettings(**values)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "devbox.example.com"])
def test_published_secrets_on_a_reachable_address_are_warned_about(
    host: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="core_base.dev"):
        warn_if_exposed(dev_settings(marketplace_token=f"mine-123456, {DEFAULT_DEV_TOKEN}"), host)
    [warning] = caplog.messages
    assert f"dev listens on {host} with the published default" in warning
    assert "MARKETPLACE_TOKEN, INTERNAL_TOKEN and WEBHOOK_SECRET:" in warning


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.0.0.2"])
def test_published_secrets_on_loopback_are_fine(
    host: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="core_base.dev"):
        warn_if_exposed(dev_settings(), host)
    assert caplog.messages == []


def test_own_secrets_on_a_reachable_address_are_fine(caplog: pytest.LogCaptureFixture) -> None:
    own = dev_settings(
        marketplace_token="mine-123456",
        internal_token="internal-123456",
        webhook_secret="whsec_AAFrZXk",
    )
    with caplog.at_level(logging.WARNING, logger="core_base.dev"):
        warn_if_exposed(own, "0.0.0.0")
    assert caplog.messages == []
    with caplog.at_level(logging.WARNING, logger="core_base.dev"):
        warn_if_exposed(dev_settings(marketplace_token="mine-123456"), "0.0.0.0")
    assert "published default INTERNAL_TOKEN and WEBHOOK_SECRET:" in caplog.messages[0]
