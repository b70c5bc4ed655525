"""Griffe extension for the API pages: read detfocal's docstrings as their authors wrote them.

- ``Example:`` (singular, as the style guide writes it) is read as griffe's ``Examples:``
  section, so ``>>>`` lines render as code instead of markdown (where ``x["a"][0]`` would be
  taken for a link).
- Sphinx roles (``:func:`name```, ``:class:`~a.b.C```) become code spans: the docstrings are
  also read with ``help()``, where the roles are the clearest way to name another object.
"""
from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)
_ROLE = re.compile(r":(?:func|class|mod|meth|data|attr|exc|obj):`(~?)([^`]+)`")


def _role(match: re.Match) -> str:
    tilde, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"


class DocstringStyle(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(_role, _EXAMPLE.sub(r"\1Examples:", obj.docstring.value))
