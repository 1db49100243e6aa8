"""Whether a URL's host is one an HTTP request can be sent to: the check shared by
the App API's callback guard and the sub-services' callback URLs."""

from __future__ import annotations

import ipaddress
import re

from yarl import URL

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# A DNS name's label in its ASCII form (internationalised names are checked after
# their IDNA encoding); underscores occur in real names, though hostnames lack them.
_LABEL = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")
# A last label that URL parsers (WHATWG's, aiohttp's) read as an IPv4 address: a
# number, decimal or hex. No top-level domain is one.
_NUMERIC_LABEL = re.compile(r"^(?:[0-9]+|0[xX][0-9A-Fa-f]*)$")
_MAX_HOST_LEN = 253


def literal_address(host: str) -> IPAddress | None:
    """The IP address ``host`` is written as (an IPv6 zone dropped), or None."""
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None


def is_valid_host(host: str) -> bool:
    """An IP literal, or a DNS name that a resolver can be asked about and the HTTP
    client takes as it is: not a NUL, an empty label, a number that is no IPv4
    address ("1.2.3.4.5", "0"), nor a character IDNA would silently drop (a soft
    hyphen, a zero-width joiner: the client refuses those)."""
    if literal_address(host) is not None:
        return True
    try:
        ascii_host = host.rstrip(".").encode("idna").decode("ascii")
        URL.build(scheme="https", host=host)
    except ValueError:  # UnicodeError included
        return False
    if not 0 < len(ascii_host) <= _MAX_HOST_LEN:
        return False
    labels = ascii_host.split(".")
    if _NUMERIC_LABEL.match(labels[-1]):
        return False
    return all(_LABEL.match(label) for label in labels)
