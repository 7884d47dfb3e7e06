"""Renders the prerequisite rule registry as the Markdown table in `docs/prerequisites.md`.

The table is generated so the documentation cannot drift from the codes and remediations the
checks return; a test compares it with the document. `python -m siterecovery.dr.ruledoc PATH`
rewrites the table between the document's markers; without PATH it prints the table.
"""

from __future__ import annotations

import sys
from pathlib import Path

from siterecovery.dr.azure_checks import AZURE_AGENT_RULES, AZURE_FAILBACK_RULES, AZURE_FAILOVER_RULES
from siterecovery.dr.checks import FAILBACK_RULES, REPROTECT_RULES
from siterecovery.dr.libvirt_capture import CAPTURE_RULES
from siterecovery.dr.libvirt_checks import LIBVIRT_RULES
from siterecovery.dr.rules import RULES

BEGIN = "<!-- rules:begin -->\n"
END = "<!-- rules:end -->"


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
            for op, listed in (
                ("reprotect", REPROTECT_RULES),
                ("failback", FAILBACK_RULES),
                ("failover to Azure", AZURE_FAILOVER_RULES),
                ("reprotect or failback from Azure", AZURE_FAILBACK_RULES),
                ("agent-based reprotect from Azure", AZURE_AGENT_RULES),
                ("move onto libvirt", LIBVIRT_RULES),
                ("protect a libvirt domain", CAPTURE_RULES),
            )
            if rule in listed
        ]
        cells = (rule.id, f"`{rule.code}`", ", ".join(blocks), _cell(rule.checked), _cell(rule.remediation))
        rows.append(f"| {' | '.join(cells)} |")
    return "\n".join(rows) + "\n"


def documented_table(document: str) -> str:
    """The table between the markers of a document."""
    return document[document.index(BEGIN) + len(BEGIN) : document.index(END)]


def update_document(path: Path) -> None:
    text = path.read_text()
    path.write_text(text[: text.index(BEGIN) + len(BEGIN)] + prerequisites_table() + text[text.index(END) :])


if __name__ == "__main__":
    if len(sys.argv) > 1:
        update_document(Path(sys.argv[1]))
    else:
        print(prerequisites_table(), end="")
