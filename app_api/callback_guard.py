"""SSRF guard for client-supplied callback URLs.

At call time a URL must be https (http only to a private address, and only when
``ALLOW_PRIVATE_CALLBACKS`` is on, for local setups), carry no credentials, and
must not name a private, loopback, link-local or otherwise non-public address
(literal or by a name that resolves to one). At delivery time the host is resolved again and every
address is checked, because DNS can change between the two (rebinding); the
request is then sent to the checked address itself.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from urllib.parse import urlsplit

from yarl import URL

from core_base.contracts import CONTROL_CHARACTERS
from core_base.errors import InvalidInputError
from core_base.http.hosts import IPAddress, is_valid_host, literal_address

MAX_URL_LEN = 2048
# A call must not hang on a slow resolver; past this the delivery-time check decides.
_CALL_TIME_RESOLVE_TIMEOUT_S = 2.0
_LOCAL_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback")
# IPv6 prefixes whose addresses stand for IPv4 ones (RFC 6052's well-known NAT64
# prefix, RFC 4291's deprecated IPv4-compatible addresses, RFC 2765's
# IPv4-translated ones), and RFC 8215's local-use NAT64 prefix, whose
# translations are the operator's own.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
_IPV4_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")
_LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")


class CallbackRefused(Exception):
    """The callback target is not a public address."""


@dataclass(frozen=True)
class ResolvedTarget:
    host: str
    port: int
    addresses: list[IPAddress]


def is_public(address: IPAddress) -> bool:
    """True for globally routable unicast addresses only. An IPv6 address that
    carries an IPv4 one (mapped, 6to4, NAT64, IPv4-compatible) is judged by that
    one: it is where the packets end up."""
    if isinstance(address, ipaddress.IPv6Address):
        if address in _LOCAL_NAT64 or address.is_site_local:
            # Translated to addresses of the local network; fec0::/10, deprecated
            # but still routed by some as the site's own.
            return False
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            return is_public(embedded)
    return address.is_global and not address.is_multicast


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64 or address in _IPV4_COMPATIBLE or address in _IPV4_TRANSLATED:
        return ipaddress.IPv4Address(int(address) & 0xFFFF_FFFF)
    return None


_UNSAFE_IN_URL = CONTROL_CHARACTERS | {" "}


def check_callback_url_syntax(url: str, *, allow_private: bool) -> None:
    """Refuse a malformed or obviously private callback URL (422 naming ``callback_url``)."""
    if len(url) > MAX_URL_LEN:
        raise InvalidInputError("callback_url", f"must be at most {MAX_URL_LEN} characters")
    # urlsplit drops tabs and line breaks silently: the webhook would go to
    # another URL than the one given (and a raw CR LF has no place in a request).
    if not _UNSAFE_IN_URL.isdisjoint(url):
        raise InvalidInputError(
            "callback_url", "must not contain spaces or control characters (percent-encode them)"
        )
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise InvalidInputError("callback_url", "is not a valid URL") from None
    allowed = ("https", "http") if allow_private else ("https",)
    if parts.scheme not in allowed:
        raise InvalidInputError(
            "callback_url",
            "must be an https URL (or http to a private address)"
            if allow_private
            else "must be an https URL",
        )
    host = parts.hostname
    if not host:
        raise InvalidInputError("callback_url", "must name a host")
    if parts.username is not None or parts.password is not None:
        raise InvalidInputError("callback_url", "must not contain credentials")
    if port == 0:
        raise InvalidInputError("callback_url", "has an invalid port")
    if not _is_valid_target(host):
        raise InvalidInputError("callback_url", "must name a valid host")
    if allow_private:
        return
    if _is_local_name(host):
        raise InvalidInputError("callback_url", "must not point to a local host")
    literal = literal_address(host)
    if literal is not None and not is_public(literal):
        raise InvalidInputError("callback_url", "must not point to a private or reserved address")


async def check_callback_url(url: str, *, allow_private: bool) -> None:
    """The call-time check: syntax, then the host's current addresses when it resolves.

    A name that does not resolve now is accepted: DNS may be briefly down, and the
    delivery-time check refuses it later if it turns out private.
    """
    check_callback_url_syntax(url, allow_private=allow_private)
    if allow_private:
        if urlsplit(url).scheme == "http" and await _reaches_a_public_address(url):
            raise InvalidInputError(
                "callback_url", "must be an https URL (http only to a private address)"
            )
        return
    try:
        await asyncio.wait_for(resolve_target(url), timeout=_CALL_TIME_RESOLVE_TIMEOUT_S)
    except CallbackRefused as exc:
        raise InvalidInputError("callback_url", str(exc)) from None
    except (OSError, TimeoutError):
        return


async def _reaches_a_public_address(url: str) -> bool:
    """``ALLOW_PRIVATE_CALLBACKS`` lets webhooks go to local receivers, some over
    plain http; it does not let them cross the internet unencrypted. A name that
    does not resolve now is given the benefit of the doubt."""
    host = request_host(url)
    if _is_local_name(host):
        return False
    literal = literal_address(host)
    if literal is not None:
        return is_public(literal)
    try:
        addresses = await asyncio.wait_for(_resolve(host, None), _CALL_TIME_RESOLVE_TIMEOUT_S)
    except (OSError, TimeoutError):
        return False
    return any(is_public(address) for address in addresses)


async def resolve_target(url: str) -> ResolvedTarget:
    """Resolve the URL's host (in the resolver's thread pool, off the event loop) and
    refuse it unless every address is public."""
    parts = urlsplit(url)
    host = request_host(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if not _is_valid_target(host):
        raise CallbackRefused("must name a valid host")
    if _is_local_name(host):
        raise CallbackRefused("must not point to a local host")
    literal = literal_address(host)
    if literal is not None:
        addresses: list[IPAddress] = [literal]
    else:
        addresses = await _resolve(host, port)
    if not addresses:
        raise OSError(f"{host} has no addresses")
    if not all(is_public(a) for a in addresses):
        raise CallbackRefused("must not point to a private or reserved address")
    return ResolvedTarget(host=host, port=port, addresses=addresses)


def _is_valid_target(host: str) -> bool:
    """A host a webhook can go to: valid, and no IPv6 zone ("[fe80::1%25eth0]"),
    which means nothing off this host and is no name a certificate could be for."""
    return is_valid_host(host) and "%" not in host


def request_host(url: str) -> str:
    """The URL's host as the webhook's HTTP client (yarl) writes it into Host and
    TLS SNI: an internationalised name in IDNA 2008 with UTS 46 mapping, in which
    ``faß.de`` is ``xn--fa-hia.de``, another domain than the ``fass.de`` of
    Python's own IDNA 2003 codec. The address checked and connected to must be
    that name's; "" when the client could not write it."""
    try:
        return URL(url).raw_host or ""
    except ValueError:  # UnicodeError included
        return ""


# Lookups of client-supplied names run in threads of their own: a caller naming
# hosts whose DNS answers slowly (or never) holds these, not the event loop's
# default pool (6 threads on 2 cores), which the storage calls share.
# (The pool starts its threads as lookups come.)
_resolver = ThreadPoolExecutor(8, thread_name_prefix="callback-dns")


async def _resolve(host: str, port: int | None) -> list[IPAddress]:
    """The host's addresses (the resolver runs in a thread pool, off the event loop)."""
    lookup = partial(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    infos = await asyncio.get_running_loop().run_in_executor(_resolver, lookup)
    return [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]


def _is_local_name(host: str) -> bool:
    lowered = host.lower().rstrip(".")
    return lowered in _LOCAL_NAMES or lowered.endswith(".localhost")
