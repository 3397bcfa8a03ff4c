"""Which judge endpoint may receive which API key, and how: $OPENAI_API_KEY, $OPENAI_ORG_ID and
$OPENAI_PROJECT_ID only the official one; a loopback endpoint never through a proxy."""

from __future__ import annotations

import ipaddress
import logging
import re
from typing import Mapping
from urllib.parse import SplitResult, urlsplit

from iq_lightning.errors import ConfigError

log = logging.getLogger(__name__)

OFFICIAL_OPENAI_URL = "https://api.openai.com/v1"
OFFICIAL_KEY_ENV = "OPENAI_API_KEY"
# The OpenAI client reads these itself when given None and sends them to any base_url.
OFFICIAL_ONLY_ENV = {"organization": "OPENAI_ORG_ID", "project": "OPENAI_PROJECT_ID"}
VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_base_url(base_url: str) -> SplitResult:
    """judge.base_url split into its parts; ConfigError (one line) for one that does not parse."""
    try:
        url = urlsplit(base_url)
        url.port  # noqa: B018 -- parsing the port is what raises for "http://host:abc"
    except ValueError as exc:
        raise ConfigError(f"judge.base_url={base_url} is not a URL ({exc}); e.g. http://localhost:8000/v1") from None
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ConfigError(f"judge.base_url={base_url} is not an http(s) URL with a host; e.g. http://localhost:8000/v1")
    return url


def check_key_variable(api_key_env: str | None) -> None:
    """judge.api_key_env names an environment variable; a pasted key would be echoed and saved in
    the run's .hydra/*.yaml, so anything else is refused without repeating it."""
    if api_key_env is None:
        return
    if not isinstance(api_key_env, str) or not VARIABLE_NAME.fullmatch(api_key_env) or _looks_like_a_key(api_key_env):
        raise ConfigError(
            "judge.api_key_env must name an environment variable that holds the key (e.g. judge.api_key_env=MY_JUDGE_KEY), "
            "not the key itself (the value given is not repeated here); put the key in that variable"
        )


def _looks_like_a_key(name: str) -> bool:
    # Keys that happen to be valid names: sk_live_..., hf_..., or a long run of letters and digits
    # with no word breaks (variable names such as MY_JUDGE_KEY_2 have them).
    lowered = name.lower()
    unbroken = len(name) >= 24 and "_" not in name and any(c.isdigit() for c in name) and any(c.islower() for c in name)
    return lowered.startswith(("sk_", "hf_", "pk_", "rk_")) or unbroken


def is_official(base_url: str | None) -> bool:
    if base_url is None:
        return True
    url = parse_base_url(base_url)
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
    check_key_variable(api_key_env)
    url = parse_base_url(base_url)
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


def official_identity(base_url: str | None, environ: Mapping[str, str]) -> dict[str, str | None]:
    """The organization and project headers the judge may send: the official endpoint's from
    $OPENAI_ORG_ID / $OPENAI_PROJECT_ID, like its key; None (no header) to any other endpoint."""
    official = is_official(base_url)
    return {arg: (environ.get(env) if official else None) for arg, env in OFFICIAL_ONLY_ENV.items()}


def use_proxy(base_url: str | None, sends_key: bool) -> bool:
    """Whether the judge's requests may go through $HTTP(S)_PROXY: never to this machine (a proxy
    there would read a loopback key in clear and could not reach the server anyway), and never a
    key over plain http."""
    if base_url is None:
        return True
    url = parse_base_url(base_url)
    return not is_loopback(url.hostname) and not (sends_key and url.scheme == "http")
