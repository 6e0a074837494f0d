"""The dashboard's HTML: `page.html` (package data, its CSS and script inline), the sign-in
form, and the Content-Security-Policy both are served with.

The page is static: the application's strings reach it only through its JSON, and its script
puts them in the document as text (`textContent`, never as markup). The policy allows nothing
but the page's own inline style and script, by their SHA-256, and requests to its own origin:
no CDN, font or script from elsewhere, and injected markup could run nothing.
"""

from __future__ import annotations

import base64
import hashlib
import html
import re
from importlib import resources

_SOURCE = resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")


def _inline(tag: str) -> str:
    """The content of the page's one `<tag>` element, exactly as the browser hashes it."""
    found = re.findall(rf"<{tag}>(.*?)</{tag}>", _SOURCE, re.DOTALL)
    if len(found) != 1:
        raise RuntimeError(f"perfmw's page.html must hold one <{tag}> element, not {len(found)}")
    return str(found[0])


_STYLE = _inline("style")
_SCRIPT = _inline("script")


def _digest(text: str) -> str:
    digest = base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode()
    return f"'sha256-{digest}'"


POLICY = (
    "default-src 'none'; "
    f"script-src {_digest(_SCRIPT)}; "
    f"style-src {_digest(_STYLE)}; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
#: Sent with the page, the sign-in form and the data.
HEADERS = [
    (b"content-security-policy", POLICY.encode("latin-1")),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]
PAGE = _SOURCE.encode("utf-8")
HTML = "text/html; charset=utf-8"

_FORM = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>perfmw: sign in</title>
<link rel="icon" href="data:,">
<style>{style}</style>
</head>
<body>
<main class="signin">
<h1><span class="logo">perfmw</span> dashboard</h1>
<p class="{tone}">{message}</p>
<form method="post" action="{action}">
<label for="token">Access token</label>
<input id="token" name="token" type="password" autocomplete="current-password" required autofocus>
<button type="submit">Open the dashboard</button>
</form>
<p class="hint">The token is the service's <code>access_token</code> setting
(<code>PERFMW_ACCESS_TOKEN</code>). Signing in sets a cookie for this page only.</p>
</main>
</body>
</html>
"""


def sign_in_form(action: str, refused: bool) -> bytes:
    """The form that posts the token to `action`, saying so if the last one was refused."""
    message = (
        "That token was refused: try again."
        if refused
        else "This service's dashboard needs its access token."
    )
    return _FORM.format(
        style=_STYLE,
        tone="refused" if refused else "hint",
        message=message,
        action=html.escape(action, quote=True),
    ).encode("utf-8")
