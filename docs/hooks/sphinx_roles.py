"""MkDocs hook: show the code's Sphinx cross-reference roles as plain code in the reference.

The docstrings write ``:class:`ConfigError``` (Sphinx style); mkdocstrings renders the name as
code and leaves the role in front of it. This drops the role, so the page reads ``ConfigError``.
"""

import re

_ROLE = re.compile(r":(?:py:)?(?:class|meth|func|attr|data|mod|exc|obj|const):(?=<code>)")


def on_page_content(html: str, **_: object) -> str:
    return _ROLE.sub("", html)
