"""Renders the prerequisite rule registry as the Markdown table in `docs/prerequisites.md`.

The table is generated so the documentation cannot drift from the codes and remediations the
checks return; a test compares it with the document. Regenerate with
`python -m siterecovery.dr.ruledoc` and paste it between the document's table markers.
"""

from __future__ import annotations

from siterecovery.dr.checks import FAILBACK_RULES, REPROTECT_RULES
from siterecovery.dr.rules import RULES


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def prerequisites_table() -> str:
    """One row per error code: rule ID, code, operations it blocks, what is checked, remediation."""
    rows = [
        "| Rule | Code | Blocks | What is checked | Remediation |",
        "|---|---|---|---|---|",
    ]
    for rule in RULES.values():
        blocks = [
            op
            for op, listed in (("reprotect", REPROTECT_RULES), ("failback", FAILBACK_RULES))
            if rule in listed
        ]
        cells = (rule.id, f"`{rule.code}`", ", ".join(blocks), _cell(rule.checked), _cell(rule.remediation))
        rows.append(f"| {' | '.join(cells)} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(prerequisites_table(), end="")
