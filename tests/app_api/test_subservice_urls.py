"""Each kind's sub-service URL comes from the setting named after its service's
prefix; a kind without a service or a setting stops the App API at start-up (it
was accepted by calls, then never handed on)."""

from __future__ import annotations

from typing import Any

import pytest

from app_api import subservices
from app_api.subservices import SubServices, api_url_for, check_every_kind_is_reachable
from core_base import services
from core_base.domain import Kind
from core_base.errors import SettingsError
from core_base.http.client import HttpClient
from tests.app_api.support import app_settings


def test_each_kind_is_reached_at_its_own_setting() -> None:
    settings = app_settings(
        audio_gen_api_url="http://sound.internal:8081/",
        music_gen_api_url="http://music.internal:8082",
    )
    assert api_url_for(settings, Kind.SOUND) == "http://sound.internal:8081"
    assert api_url_for(settings, Kind.MUSIC) == "http://music.internal:8082"
    check_every_kind_is_reachable(settings)  # every Kind has a service and a setting


def test_a_kind_without_a_url_setting_stops_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = services.service_spec(Kind.MUSIC)

    class Renamed:  # a service whose prefix no AppSettings field matches
        env_prefix = "SPEECH_GEN_"
        title = spec.title

    def service_spec(kind: Kind) -> Any:
        return Renamed if kind is Kind.MUSIC else services.service_spec(kind)

    monkeypatch.setattr(subservices, "service_spec", service_spec)
    with pytest.raises(SettingsError, match=r"^SPEECH_GEN_API_URL: not a setting of the App API"):
        SubServices(HttpClient(), app_settings(), "internal")


def test_a_kind_without_a_service_stops_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(services.SERVICE_SPECS, Kind.MUSIC)
    with pytest.raises(SettingsError, match=r"^kind 'music' has no generation service"):
        check_every_kind_is_reachable(app_settings())
