"""Outbound HTTP to the hosts an integration names (the CRMs): no redirects, public addresses only.

A CRM's URL is typed in by a person, and every call carries a secret: amoCRM's bearer token, or
Bitrix24's webhook URL, which is a secret itself. requests follows redirects by default, to any host,
keeping the Authorization header when the host stays the same and the secret path in any case; and a
name that passed validation may still resolve to an address inside the deployment's network (an
on-premise portal's DNS record pointing at 10.0.0.5 or 169.254.169.254). So the CRM adapters
(`crm/amocrm/api.py`, `crm/bitrix24/api.py`) use `session()`:

* no redirect is followed, whatever a caller passes as `allow_redirects` (the adapters pass False
  too): a 3xx comes back as the answer, which each adapter turns into `Misconfigured`, saying where
  it pointed (`redirect_target`, host only: the path may carry the secret);
* after the TCP connection is made and before a byte is sent (no TLS handshake, no request), the
  peer's address must be public (`is_public`), else `PrivateAddress`. Checking the connected socket,
  not a separate DNS lookup, leaves no gap for a name that resolves differently the second time.
  Loopback is allowed only where the deployment allows it (`Settings.allow_loopback_crm`: the local
  stack and the tests, whose sandboxes listen on 127.0.0.1);
* proxy and .netrc settings from the environment are ignored (`trust_env = False`): a proxy would be
  the peer checked, and .netrc could add credentials of its own.
"""
from __future__ import annotations

import ipaddress
from typing import Any, Mapping
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class PrivateAddress(Exception):
    """The CRM's host name led to an address this deployment does not call. Not an `OSError` on
    purpose: urllib3 and requests wrap those into a generic connection error; this one reaches the
    adapter as it is, to become `Misconfigured` (a person must fix the URL or the DNS record)."""

    def __init__(self, host: str, address: str) -> None:
        super().__init__(f"{host} resolves to {address}, which is not a public address")
        self.host, self.address = host, address


def is_public(address: str, *, allow_loopback: bool = False) -> bool:
    """Whether an IP address (as a socket reports it) is one the internet routes to: not private,
    loopback, link-local, shared (100.64/10), reserved or multicast, nor an IPv6 form that embeds such
    an IPv4 address (::ffff:10.0.0.1, 6to4, NAT64). Loopback passes only with `allow_loopback`."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # a link-local IPv6 peer carries its zone
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:a.b.c.d is that IPv4 address
    if allow_loopback and ip.is_loopback:
        return True
    candidates: list[Any] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):  # 6to4 and NAT64 route to the IPv4 address they embed
        candidates.append(ip.sixtofour)
        if ip in _NAT64:
            candidates.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return all(c.is_global and not c.is_multicast for c in candidates if c is not None)


def redirect_target(headers: Mapping[str, str]) -> str:
    """Where a 3xx answer pointed, for an error message: `to https://host[:port]`, without the path
    and query, which may carry the secret (a Bitrix24 webhook URL's code) or anything else."""
    location = next((str(v) for k, v in headers.items() if str(k).lower() == "location"), "").strip()
    if not location:
        return "without a Location"
    try:
        parts = urlsplit(location)
        host, port = parts.hostname, parts.port
    except ValueError:
        return "to an unreadable Location"
    if not host:
        return "to another path on the same host"
    shown = f"{parts.scheme or 'https'}://{host}" + (f":{port}" if port else "")
    return "to " + "".join(ch for ch in shown[:200] if ch.isprintable() and not ch.isspace())


class _PeerCheck:
    """Mixed into urllib3's connection classes: the peer is judged right after the socket connects."""

    allow_loopback = False

    def _new_conn(self) -> Any:
        sock = super()._new_conn()  # type: ignore[misc]
        try:
            address = sock.getpeername()[0]
        except OSError:
            sock.close()
            raise
        if not is_public(address, allow_loopback=self.allow_loopback):
            sock.close()
            raise PrivateAddress(getattr(self, "host", "?"), address)
        return sock


def _pool_classes(allow_loopback: bool) -> dict[str, type]:
    check = type("PeerCheck", (_PeerCheck,), {"allow_loopback": allow_loopback})
    http = type("CheckedHTTPConnection", (check, HTTPConnection), {})
    https = type("CheckedHTTPSConnection", (check, HTTPSConnection), {})
    return {"http": type("CheckedHTTPConnectionPool", (HTTPConnectionPool,), {"ConnectionCls": http}),
            "https": type("CheckedHTTPSConnectionPool", (HTTPSConnectionPool,), {"ConnectionCls": https})}


_POOL_CLASSES = {flag: _pool_classes(flag) for flag in (False, True)}


class _CheckedAdapter(HTTPAdapter):
    def __init__(self, allow_loopback: bool) -> None:
        self._pool_classes = _POOL_CLASSES[allow_loopback]  # before HTTPAdapter builds its pool manager
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = dict(self._pool_classes)


class _NoRedirects(requests.Session):
    """A session that has no redirect to follow: requests asks `resolve_redirects` for the next hop
    (and, with `allow_redirects=False`, for `Response.next`); here there is none."""

    def resolve_redirects(self, *args: Any, **kwargs: Any) -> Any:
        return iter(())


def session(*, allow_loopback: bool | None = None) -> requests.Session:
    """A requests session for calls to a CRM (see the module's docstring). `allow_loopback`: None
    takes the deployment's setting (`ALLOW_LOOPBACK_CRM`)."""
    if allow_loopback is None:
        from .settings import get_settings
        allow_loopback = get_settings().allow_loopback_crm
    checked = _NoRedirects()
    checked.trust_env = False
    adapter = _CheckedAdapter(allow_loopback)
    checked.mount("http://", adapter)
    checked.mount("https://", adapter)
    return checked
