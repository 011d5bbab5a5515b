"""The OpenAPI document is valid 3.1, generated from the wire types, and /docs serves locally."""

from __future__ import annotations

from openapi_spec_validator import validate


async def test_openapi_document_validates_as_openapi_3_1(app_client, make_settings) -> None:
    client = await app_client(make_settings())
    response = await client.get("/openapi.json")
    assert response.status == 200
    document = await response.json()
    assert document["openapi"] == "3.1.0"
    validate(document)


async def test_openapi_ingest_schema_comes_from_the_record_struct(app_client, make_settings) -> None:
    client = await app_client(make_settings())
    document = await (await client.get("/openapi.json")).json()
    record = document["components"]["schemas"]["Record"]
    assert record["properties"]["features"]["maxItems"] == 4096
    assert "features" in record["required"]


async def test_every_documented_error_answer_has_a_body_schema(app_client, make_settings) -> None:
    """A problem document, unless the route answers its own type (readiness)."""
    client = await app_client(make_settings())
    document = await (await client.get("/openapi.json")).json()
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if int(status) >= 400:
                    schemas = {media["schema"]["$ref"] for media in response["content"].values()}
                    assert len(schemas) == 1, (method, path, status)
                    if "ready" not in path:
                        assert schemas == {"#/components/schemas/Problem"}, (method, path, status)


async def test_docs_page_and_its_assets_are_served_without_a_cdn(app_client, make_settings) -> None:
    client = await app_client(make_settings())
    page = await (await client.get("/docs")).text()
    assert "http" not in page.split("<body>")[1]
    asset = await client.get("/docs/static/swagger-ui-bundle.js")
    assert asset.status == 200


async def test_every_answer_declares_the_headers_it_carries(app_client, make_settings) -> None:
    """A review: the document declared no response header at all (Retry-After,
    RateLimit, Idempotent-Replayed, X-Request-ID, v1's Deprecation and Sunset)."""
    client = await app_client(make_settings())
    document = await (await client.get("/openapi.json")).json()
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            assert any(p["name"] == "X-Request-ID" for p in operation["parameters"]), (method, path)
            for status, response in operation["responses"].items():
                headers = response["headers"]
                assert "X-Request-ID" in headers, (method, path, status)
                if status in ("429", "503"):
                    assert "Retry-After" in headers, (method, path, status)
                if operation.get("deprecated"):
                    assert {"Deprecation", "Sunset"} <= set(headers), (method, path, status)
    ingest = document["paths"]["/api/v2/ingest"]["post"]["responses"]
    assert {"RateLimit-Policy", "RateLimit", "Idempotent-Replayed"} <= set(ingest["202"]["headers"])
    assert "WWW-Authenticate" in ingest["401"]["headers"]


async def test_the_headers_documented_for_an_accepted_ingest_are_on_it(
    app_client, make_settings, api_keys
) -> None:
    key = api_keys.create(scopes="ingest")
    client = await app_client(
        make_settings(auth_disabled=False, keys_file=str(api_keys.path), feature_dims=(4,))
    )
    document = await (await client.get("/openapi.json")).json()
    documented = document["paths"]["/api/v2/ingest"]["post"]["responses"]["202"]["headers"]
    response = await client.post(
        "/api/v2/ingest",
        json={"source": "s", "records": [{"features": [1.0, 2.0, 3.0, 4.0]}]},
        headers={"X-API-Key": key},
    )
    assert response.status == 202
    always = set(documented) - {"Idempotent-Replayed"}  # that one only on a replay
    assert always <= set(response.headers)
