"""socksd: a SOCKS5 proxy server and client library (RFC 1928, RFC 1929, RFC 1961)."""

__version__ = "0.1.0"
