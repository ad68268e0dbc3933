"""The report's one Jinja environment: the templates in ``report/templates``, escaped, with the house's filters.

:data:`ENVIRONMENT` renders the page (``report.html.j2``); :data:`PARTS` is the
module of ``parts.html.j2``, the macros every section builds its HTML from
(``PARTS.table(...)``, ``PARTS.figures(...)``). One environment means one
place to add a filter, and the templates are loaded and compiled once.
"""

from __future__ import annotations

from typing import Any

import jinja2


def thousands(number: int) -> str:
    """``1234567`` -> ``"1,234,567"`` (parameter counts)."""
    return f"{number:,}"


ENVIRONMENT = jinja2.Environment(
    loader=jinja2.PackageLoader("convlens.report", "templates"), autoescape=jinja2.select_autoescape(["html", "j2"])
)
ENVIRONMENT.filters["thousands"] = thousands
# The macros (table, figures, ...) are attributes Jinja sets on the template module at run time,
# which its stub cannot list: Any lets the sections call them.
PARTS: Any = ENVIRONMENT.get_template("parts.html.j2").module
