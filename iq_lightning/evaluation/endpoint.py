"""Which judge endpoint may receive which API key: $OPENAI_API_KEY only the official one."""

from __future__ import annotations

import ipaddress
import logging
from typing import Mapping
from urllib.parse import urlsplit

from iq_lightning.errors import ConfigError

log = logging.getLogger(__name__)

OFFICIAL_OPENAI_URL = "https://api.openai.com/v1"
OFFICIAL_KEY_ENV = "OPENAI_API_KEY"


def is_official(base_url: str | None) -> bool:
    if base_url is None:
        return True
    url = urlsplit(base_url)
    return url.scheme == "https" and url.hostname == "api.openai.com" and url.port in (None, 443)


def is_loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


def judge_api_key(base_url: str | None, api_key_env: str | None, environ: Mapping[str, str], warn: bool = True) -> str | None:
    """The API key the judge may send to `base_url` (None: send none).

    $OPENAI_API_KEY goes only to the official endpoint (https://api.openai.com). Any other
    endpoint gets a key only from a variable the user named for it (judge.api_key_env=VAR, VAR
    not OPENAI_API_KEY), and only over https or to this machine (localhost, loopback): a key over
    plain http to another host is a ConfigError. The key itself is never logged."""
    if is_official(base_url):
        return environ.get(api_key_env) if api_key_env else None
    url = urlsplit(base_url)
    if not api_key_env or api_key_env == OFFICIAL_KEY_ENV:
        if warn and api_key_env and environ.get(api_key_env):
            log.warning(
                "judge.base_url=%s is not api.openai.com: $%s is not sent to it (sending no key); if the endpoint needs one, "
                "put it in another variable and name it with judge.api_key_env=VAR", base_url, OFFICIAL_KEY_ENV,
            )
        return None
    if url.scheme != "https" and not is_loopback(url.hostname):
        raise ConfigError(
            f"judge.base_url={base_url}: the key in ${api_key_env} would travel unencrypted to {url.hostname}; "
            "use https (plain http is allowed only to localhost)"
        )
    key = environ.get(api_key_env)
    if not key:
        raise ConfigError(f"judge.api_key_env={api_key_env}: ${api_key_env} is not set (it names the key for {base_url})")
    return key
