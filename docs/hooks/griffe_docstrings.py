"""A Griffe extension for the API reference: edge_sleep's docstrings as mkdocstrings renders them.

The docstrings are Google style with two habits the Google parser does not read:

- reST cross-reference roles (``:class:`~edge_sleep.config.PrivacyConfig```, ``:meth:`save```) are
  turned into optional cross-references: a link where the target is on the API page, a code span
  otherwise (never a warning);
- an ``Example:`` heading is read as ``Examples:``, and a doctest outside any section is fenced
  as ``pycon``, so both render as code instead of nested block quotes.

Only the text mkdocstrings parses changes; the source files and their doctests are untouched.
``mkdocs.yml`` loads this file (``plugins: mkdocstrings: ... extensions``).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|data|attr|exc|obj|const):`(~?)([^`<>]+)`")
_EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", flags=re.M)
_BARE_DOCTEST = re.compile(r"^>>> .*(?:\n[^\n]*\S[^\n]*)*", flags=re.M)  # from column 0 to a blank line


def _resolve(obj: griffe.Object, name: str) -> str:
    """The full path of a relative ``name`` in ``obj``'s docstring: ``obj``'s member, or its parents'."""
    first = name.split(".", 1)[0]
    scope: griffe.Object | None = obj
    while scope is not None:
        if first in scope.members:
            return f"{scope.path}.{name}"
        scope = scope.parent
    return name


def _rewrite(text: str, obj: griffe.Object) -> str:
    def role(m: re.Match[str]) -> str:
        tilde, target = m.group(1), m.group(2).strip()
        title = target.rsplit(".", 1)[-1] if tilde else target
        identifier = target if target.startswith(("edge_sleep.", "torch.")) else _resolve(obj, target)
        return f'<autoref identifier="{identifier}" optional><code>{title}</code></autoref>'

    text = _BARE_DOCTEST.sub(lambda m: f"```pycon\n{m.group(0)}\n```", text)
    return _EXAMPLE.sub(r"\1Examples:", _ROLE.sub(role, text))


class RstRoles(griffe.Extension):
    """Rewrite each object's docstring text (see the module docstring)."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _rewrite(obj.docstring.value, obj)
