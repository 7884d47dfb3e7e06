"""Options shared by every API command (--server, --token, --output)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import typer

from siterecovery.api_client import Api, ApiError
from siterecovery.cli.output import fail

T = TypeVar("T")


@dataclass
class CliState:
    api: Api
    as_json: bool


def state(ctx: typer.Context) -> CliState:
    root = ctx.find_root()
    if not isinstance(root.obj, CliState):
        root.obj = CliState(Api.from_env(None, None), False)
    return root.obj


def call(ctx: typer.Context, fn: Callable[[Api], T]) -> T:
    """Run an API call; a problem response is printed and becomes a non-zero exit."""
    st = state(ctx)
    try:
        return fn(st.api)
    except ApiError as exc:
        raise fail(exc, st.as_json) from None


def as_json(ctx: typer.Context) -> bool:
    return state(ctx).as_json
