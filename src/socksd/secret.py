"""Passwords socksd sends to other services (an upstream proxy, an LDAP search bind), read from a
file or the environment, never from the config file itself: one reader, one set of errors."""

from __future__ import annotations

import os
from pathlib import Path


class SecretError(ValueError):
    """A password cannot be read; the message names the key and says why."""


def read_secret(key: str, file: Path | None, env: str | None) -> str | None:
    """The password in the first line of ``file``, else in the variable ``env`` (None: neither
    given). ``key`` is the config key's prefix for errors (``upstreams.NAME.password``)."""
    if file is not None:
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as e:
            raise SecretError(f"{key}_file: cannot read {file}: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise SecretError(f"{key}_file: {file} is not UTF-8 text") from None
        password = text.split("\n", 1)[0].removesuffix("\r")
        if not password:
            raise SecretError(f"{key}_file: the first line of {file} is empty")
        return password
    if env is not None:
        value = os.environ.get(env)
        if not value:
            raise SecretError(f"{key}_env: ${env} is not set (or empty) in socksd's environment")
        return value
    return None
