"""Keep broker passwords out of what celery-concurrent logs, reports and raises.

Celery masks the URLs it prints itself (``kombu.utils.url.maybe_sanitize_url``); these helpers do
the same for ours, and for error texts that may quote a URL.
"""

from __future__ import annotations

import re

from kombu.utils.url import maybe_sanitize_url

#: ``scheme://user:password@`` anywhere in a text
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@]*:)[^\s@/]+@")


def mask_urls(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``**``."""
    return _URL_PASSWORD.sub(r"\g<head>**@", text)


def safe_url(url: str) -> str:
    """A broker URL as it may be shown: its password replaced by ``**``."""
    return str(maybe_sanitize_url(url))
