"""Operations endpoints: OpenAPI description, liveness and readiness."""

from __future__ import annotations

from typing import Any

import httpx

from conformance.check import normalize


def test_openapi_lists_the_dicomweb_paths(http: httpx.Client) -> None:
    response = http.get("/openapi/openapi.json")
    assert response.status_code == 200
    document = response.json()
    assert document["info"]["title"] == "Hounsfield"
    paths = {normalize(p) for p in document["paths"]}
    assert "/dicom-web/studies" in paths
    assert "/dicom-web/studies/{study}" in paths
    assert "post" in document["paths"]["/dicom-web/studies"]
    assert "/healthz" in paths and "/readyz" in paths
    assert http.get("/openapi").status_code == 200  # the rendered UI


def test_healthz(http: httpx.Client) -> None:
    response = http.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_readyz(http: httpx.Client) -> None:
    response = http.get("/readyz")
    assert response.status_code == 200 and response.json() == {"status": "ready"}


def test_readyz_when_the_database_is_gone(make_server: Any) -> None:
    import asyncio

    server = make_server()
    loop_pool = server.pool

    # Close the pool on the server's own event loop: readiness must then report 503, not crash.
    async def close() -> None:
        await loop_pool.close()

    future = asyncio.run_coroutine_threadsafe(close(), loop_pool._loop)
    future.result(timeout=30)
    response = httpx.get(server.url + "/readyz", timeout=10)
    assert response.status_code == 503
    assert response.json()["status"] == "unavailable"
