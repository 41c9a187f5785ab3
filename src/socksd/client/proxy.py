"""Where the proxy is and how to log in to it: :class:`Proxy`, or a ``socks5://`` URL string."""

from __future__ import annotations

from dataclasses import dataclass, field

from socksd.client.gssapi import GssapiOptions


@dataclass(frozen=True, slots=True)
class Proxy:
    """Where the proxy is and how to log in to it.

    With ``gssapi`` set every command authenticates with GSS-API (RFC 1961), plus
    username/password when ``username`` is set too; "no authentication" is then never offered.
    """

    host: str
    port: int = 1080
    username: str | bytes | None = None
    password: str | bytes | None = field(default=None, repr=False)
    gssapi: GssapiOptions | None = None

    @classmethod
    def parse(cls, url: str, *, gssapi: GssapiOptions | None = None) -> Proxy:
        """``socks5://user:pass@host:port`` or ``host:port`` (IPv6 as ``[::1]:1080``)."""
        from urllib.parse import unquote, urlsplit

        parts = urlsplit(url if "://" in url else f"socks5://{url}")
        if parts.scheme not in ("socks5", "socks5h"):
            raise ValueError(f"not a socks5:// URL: {url!r}")
        if parts.hostname is None:
            raise ValueError(f"no proxy host in {url!r}")
        user = unquote(parts.username) if parts.username is not None else None
        password = unquote(parts.password) if parts.password is not None else None
        return cls(parts.hostname, parts.port or 1080, user, password, gssapi)

    @property
    def where(self) -> str:
        """``host:port`` for messages (IPv6 in brackets)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


ProxyLike = Proxy | str
"""What every entry point takes: a :class:`Proxy` or a URL for :meth:`Proxy.parse`."""


def as_proxy(proxy: ProxyLike) -> Proxy:
    """``proxy`` itself, or the :class:`Proxy` its URL describes."""
    return Proxy.parse(proxy) if isinstance(proxy, str) else proxy
