"""MkDocs hook: render the Sphinx roles of our docstrings as plain code.

The docstrings are written for Sphinx-style readers (``:func:`fit```,
``:class:`~pyroseg.config.FitConfig```); mkdocstrings shows them as
``:func:<code>fit</code>``. This drops the role and, as Sphinx does for
``~``, keeps the last component of the name.
"""

import re

_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|data|attr|exc|obj|const):<code>(~?)([^<]*)</code>")


def _code(m: re.Match) -> str:
    name = m.group(2)
    return f"<code>{name.rsplit('.', 1)[-1] if m.group(1) else name}</code>"


def on_page_content(html: str, **kwargs) -> str:
    return _ROLE.sub(_code, html)
