"""The client of the REST API, the only way of the CLI and the demo to the configuration server.

Problem responses become `ApiError` with the server's code, message and remediation, which the
CLI prints and turns into a non-zero exit.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from typing import Any

import httpx

DEFAULT_SERVER = "http://127.0.0.1:8443"


class ApiError(Exception):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        self.body = body
        self.problems: list[dict[str, Any]] = list(body.get("problems") or [body])
        super().__init__(str(body.get("message") or body.get("title") or f"HTTP {status}"))


@dataclass
class Api:
    server: str
    token: str | None
    verify: str | bool = True

    @classmethod
    def from_env(cls, server: str | None, token: str | None, ca_file: str | None = None) -> Api:
        return cls(
            server=(server or os.environ.get("SITERECOVERY_SERVER") or DEFAULT_SERVER).rstrip("/"),
            token=token or os.environ.get("SITERECOVERY_TOKEN"),
            verify=ca_file or os.environ.get("SITERECOVERY_CA_FILE") or True,
        )

    def request(self, method: str, path: str, json: Any = None, params: dict[str, Any] | None = None) -> Any:
        return self._body(self._send(method, path, json, params))

    def _send(
        self, method: str, path: str, json: Any = None, params: dict[str, Any] | None = None
    ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            resp = httpx.request(
                method,
                self.server + path,
                json=json,
                params=params,
                headers=headers,
                timeout=60,
                verify=ssl.create_default_context(cafile=self.verify)
                if isinstance(self.verify, str)
                else self.verify,
            )
        except httpx.HTTPError as exc:
            raise ApiError(
                0,
                {
                    "code": "server-unreachable",
                    "message": f"Cannot reach the configuration server at {self.server}: {exc}.",
                    "remediation": "Start it (`siterecovery server`) or pass --server / SITERECOVERY_SERVER.",
                },
            ) from exc
        if resp.status_code >= 400:
            try:
                body = resp.json()
            except ValueError:
                body = {"code": "http-error", "message": resp.text[:500] or f"HTTP {resp.status_code}"}
            raise ApiError(resp.status_code, body if isinstance(body, dict) else {"message": str(body)})
        return resp

    @staticmethod
    def _body(resp: httpx.Response) -> Any:
        if resp.headers.get("content-type", "").startswith("application/json"):
            return resp.json()
        return resp.text

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None})

    def get_all(self, path: str, **params: Any) -> list[Any]:
        """Every row of a paged list route: follows `X-Next-After` until the last page."""
        rows: list[Any] = []
        query = {k: v for k, v in params.items() if v is not None}
        while True:
            resp = self._send("GET", path, params=query)
            rows += self._body(resp)
            after = resp.headers.get("X-Next-After")
            if not after:
                return rows
            query["after"] = after

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, json=body if body is not None else {})

    def delete(self, path: str, **params: Any) -> Any:
        return self.request("DELETE", path, params={k: v for k, v in params.items() if v is not None})

    def patch(self, path: str, body: Any) -> Any:
        return self.request("PATCH", path, json=body)
