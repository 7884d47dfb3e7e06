"""Keyset paging of list routes: `?limit=N&after=CURSOR`, the next cursor in a response header.

A list answers at most `limit` rows in a stable order; when more follow, `X-Next-After` carries
the cursor of the last row and `Link: <...>; rel="next"` the whole next URL. Bodies stay plain
JSON lists, so a client that ignores the header still gets the first page, and one that pages
(the CLI, the bench) follows the header until it is absent. Keyset, not offset: a page costs the
same at the end of 5,000 items as at the start, and rows added meanwhile do not shift pages.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from fastapi import Request, Response

R = TypeVar("R")

NEXT_HEADER = "X-Next-After"


def page(
    rows: Sequence[R], limit: int, request: Request, response: Response, cursor: Callable[[R], str]
) -> Sequence[R]:
    """`rows` were fetched with `limit + 1`: answer `limit` of them and say where the next page starts."""
    if len(rows) <= limit:
        return rows
    shown = rows[:limit]
    after = cursor(shown[-1])
    response.headers[NEXT_HEADER] = after
    response.headers["Link"] = f'<{request.url.include_query_params(after=after, limit=limit)}>; rel="next"'
    return shown
