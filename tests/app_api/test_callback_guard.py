"""The SSRF guard of callback URLs (call time and delivery time)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
from typing import Any

import pytest
from yarl import URL

from app_api import callback_guard
from app_api.callback_guard import (
    CallbackRefused,
    check_callback_url,
    check_callback_url_syntax,
    is_public,
    resolve_target,
)
from core_base.errors import InvalidInputError


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",
        "0.0.0.0",
        "100.64.0.1",
        "::1",
        "fe80::1",
        "fc00::1",
        "::ffff:127.0.0.1",
        "224.0.0.1",
        "240.0.0.1",
        # IPv6 addresses that carry a private IPv4 one, or translate to the local network.
        "64:ff9b::7f00:1",
        "64:ff9b::a00:1",
        "64:ff9b:1::5db8:d822",
        "2002:7f00:1::",
        "2002:c0a8:101::1",
        "::127.0.0.1",
        "::a00:1",
        "::ffff:0:7f00:1",  # IPv4-translated (RFC 2765)
        "::ffff:0:a00:1",
        "fec0::1",  # site-local (deprecated, still routed by some)
    ],
)
def test_non_public_addresses(address: str) -> None:
    assert not is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    "address",
    ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "64:ff9b::808:808", "2002:808:808::1"],
)
def test_public_addresses(address: str) -> None:
    assert is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1/x",
        "https://localhost/x",
        "https://foo.localhost/x",
        "https://[::ffff:10.0.0.1]/x",
        "https://0x7f000001/x",
        "http://93.184.216.34/x",
        "ftp://93.184.216.34/x",
        "https:///nohost",
        "https://93.184.216.34:99999/x",
        "https://exa\x00mple.com/x",
        "https://exa mple.com/x",
        "https://a..example.com/x",
        "https://-a.example.com/x",
        "https://" + "x" * 64 + ".example.com/x",
    ],
)
async def test_refused_at_call_time(url: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        await check_callback_url(url, allow_private=False)
    assert info.value.field == "callback_url"


@pytest.mark.parametrize(
    "url",
    [
        "https://1.2.3.4.5/",  # a number, but no IPv4 address: the client refuses it
        "https://0/",
        "https://a.123/",  # URL parsers read a numeric last label as IPv4; no TLD is one
        "https://a.0x1f/",
        "https://exa\u00admple.com/",  # a soft hyphen, which IDNA would drop
        "https://a\u200db.com/",  # a zero-width joiner
    ],
)
@pytest.mark.parametrize("allow_private", [False, True])
async def test_hosts_the_delivery_client_refuses_are_refused_at_call_time(
    url: str, allow_private: bool
) -> None:
    """A webhook that could never be sent is a 422 now, not hours of retries."""
    with pytest.raises(InvalidInputError, match="valid host") as info:
        await check_callback_url(url, allow_private=allow_private)
    assert info.value.field == "callback_url"


@pytest.mark.parametrize(
    "url",
    [
        "https://b\u00fccher.de/x",
        "https://xn--bcher-kva.de/x",
        "https://\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.com/x",  # full-width
        "https://a.b1/x",
        "https://hooks_1.example.com/x",
    ],
)
def test_unusual_but_valid_hosts_pass_the_syntax_check(url: str) -> None:
    check_callback_url_syntax(url, allow_private=False)


async def test_public_and_unresolvable_names_are_accepted_at_call_time() -> None:
    await check_callback_url("https://93.184.216.34/hook", allow_private=False)
    # Unresolvable now: the delivery-time check decides later.
    await check_callback_url("https://hooks.invalid/x", allow_private=False)


async def test_internationalised_names_are_accepted_at_call_time() -> None:
    await check_callback_url("https://b\u00fccher.invalid/hook", allow_private=False)


async def test_private_targets_allowed_when_configured() -> None:
    await check_callback_url("http://127.0.0.1:8000/hook", allow_private=True)
    await check_callback_url("http://localhost:8000/hook", allow_private=True)
    await check_callback_url("https://10.1.2.3/hook", allow_private=True)
    await check_callback_url("https://93.184.216.34/hook", allow_private=True)


@pytest.mark.parametrize("url", ["http://93.184.216.34/hook", "http://[2606:4700::1111]/x"])
async def test_plain_http_to_a_public_address_is_refused_even_when_private_is_allowed(
    url: str,
) -> None:
    """The setting is for local receivers; it does not send webhooks (with their
    presigned URLs) across the internet unencrypted."""
    with pytest.raises(InvalidInputError, match="https") as info:
        await check_callback_url(url, allow_private=True)
    assert info.value.field == "callback_url"


@pytest.mark.parametrize("allow_private", [False, True])
async def test_a_host_no_resolver_can_take_is_refused_even_when_private_is_allowed(
    allow_private: bool,
) -> None:
    with pytest.raises(InvalidInputError):
        await check_callback_url("https://exa\x00mple.com/x", allow_private=allow_private)


async def test_delivery_time_resolution_refuses_private_results() -> None:
    with pytest.raises(CallbackRefused):
        await resolve_target("https://127.0.0.1/x")
    with pytest.raises(CallbackRefused):
        await resolve_target("https://2130706433/x")
    # A stored URL from before hosts were checked at call time: refused, not an error.
    with pytest.raises(CallbackRefused):
        await resolve_target("https://exa\x00mple.com/x")
    target = await resolve_target("https://93.184.216.34:8443/x")
    assert target.port == 8443 and str(target.addresses[0]) == "93.184.216.34"


@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("https://fa\u00df.de/hook", "xn--fa-hia.de"),  # IDNA 2003 would say fass.de
        ("https://FA\u00df.de:8443/hook", "xn--fa-hia.de"),
        ("https://b\u00fccher.example/hook", "xn--bcher-kva.example"),
    ],
)
async def test_the_name_checked_is_the_one_the_webhook_client_sends(
    monkeypatch: pytest.MonkeyPatch, url: str, name: str
) -> None:
    """Resolved, checked and connected to (TLS name) as the HTTP client writes
    the Host header, not as Python's older IDNA codec would (another domain)."""
    asked: list[str] = []

    async def resolve(host: str, port: int | None) -> list[ipaddress.IPv4Address]:
        asked.append(host)
        return [ipaddress.IPv4Address("93.184.216.34")]

    monkeypatch.setattr(callback_guard, "_resolve", resolve)
    target = await resolve_target(url)
    assert asked == [name]
    assert target.host == name
    assert URL(url).raw_host == name  # what the client puts in Host


@pytest.mark.parametrize("host", ["[fe80::1%25eth0]", "[2606:4700::1111%25eth0]"])
async def test_an_ipv6_zone_id_is_refused(host: str) -> None:
    """Public address or not: a zone means nothing elsewhere, and the TLS name
    would keep it (no certificate is for it: 24 h of failed attempts)."""
    with pytest.raises(InvalidInputError, match="valid host"):
        await check_callback_url(f"https://{host}/x", allow_private=False)
    with pytest.raises(InvalidInputError, match="valid host"):
        await check_callback_url(f"https://{host}/x", allow_private=True)
    with pytest.raises(CallbackRefused):
        await resolve_target(f"https://{host}/x")


async def test_lookups_that_hang_leave_the_default_thread_pool_free(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A caller naming hosts whose DNS never answers holds the guard's own
    threads, not the pool that the storage calls (asyncio.to_thread) share."""
    release = threading.Event()

    def hanging_lookup(host: str, port: object, **kwargs: object) -> list[Any]:
        release.wait(timeout=30)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 443))]

    monkeypatch.setattr(socket, "getaddrinfo", hanging_lookup)
    lookups = [
        asyncio.create_task(resolve_target(f"https://slow-{i}.example/hook")) for i in range(40)
    ]
    try:
        await asyncio.sleep(0.1)
        # Would wait behind the hanging lookups if they held the default pool.
        assert await asyncio.wait_for(asyncio.to_thread(lambda: "free"), timeout=10) == "free"
    finally:
        release.set()
        targets = await asyncio.gather(*lookups)
    assert {str(t.addresses[0]) for t in targets} == {"93.184.216.34"}
