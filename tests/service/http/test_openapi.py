"""The OpenAPI document is valid 3.1, generated from the wire types, and /docs serves locally."""

from __future__ import annotations

import gzip
import re

import pytest
from openapi_spec_validator import validate

from mlgate.service.http.openapi import accepts_gzip
from mlgate.service.predict.flow import timeout_ms_in


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
    assert record["properties"]["features"]["items"] == {"type": "number"}
    assert "features" in record["required"]
    assert set(record["properties"]) == {"record_id", "timestamp", "features", "label", "metadata"}


async def test_openapi_batch_limit_is_the_configured_one(app_client, make_settings) -> None:
    """A review: the document said 100,000 records (the wire type's widest) while the
    server refused 10,001 (MLGATE_MAX_BATCH_RECORDS)."""
    client = await app_client(make_settings(max_batch_records=250))
    document = await (await client.get("/openapi.json")).json()
    records = document["components"]["schemas"]["IngestRequest"]["properties"]["records"]
    assert records["maxItems"] == 250
    too_many = {"source": "s", "records": [{"features": [0.0] * 128}] * 251}
    response = await client.post("/api/v2/ingest", json=too_many)
    assert response.status == 422


async def test_openapi_feature_counts_are_the_configured_dimensions(app_client, make_settings) -> None:
    client = await app_client(make_settings(feature_dims=(5, 3)))
    document = await (await client.get("/openapi.json")).json()
    features = document["components"]["schemas"]["Record"]["properties"]["features"]
    assert features["anyOf"] == [{"minItems": 3, "maxItems": 3}, {"minItems": 5, "maxItems": 5}]
    assert (features["minItems"], features["maxItems"]) == (3, 5)


async def test_openapi_patterns_are_json_schema_patterns(app_client, make_settings) -> None:
    """A review: the source pattern came out as ``^[A-Za-z0-9._:-]+$(?!\\n)``, Python's
    guard against ``$`` matching before a final newline, which JSON Schema's ``$`` never does."""
    client = await app_client(make_settings())
    text = await (await client.get("/openapi.json")).text()
    assert "(?!" not in text
    document = await (await client.get("/openapi.json")).json()
    source = document["components"]["schemas"]["IngestRequest"]["properties"]["source"]
    assert source["pattern"] == "^[A-Za-z0-9._:-]+$"
    response = await client.post("/api/v2/ingest", json={"source": "s\n", "records": [{"features": [0.0] * 128}]})
    assert response.status == 422


async def test_every_route_but_the_docs_page_assets_is_documented(app_client, make_settings) -> None:
    """A review: /metrics, /openapi.json and /docs were served but not documented."""
    client = await app_client(make_settings())
    document = await (await client.get("/openapi.json")).json()
    for path in ("/metrics", "/openapi.json", "/docs", "/health", "/ready"):
        assert "get" in document["paths"][path], path
        assert document["paths"][path]["get"]["security"] == [], path


async def test_x_request_timeout_is_documented_on_every_route_that_reads_it(
    app_client, make_settings
) -> None:
    """A review: only v2 predict documented it; v1 predict and the OIP infer read it too."""
    client = await app_client(make_settings())
    document = await (await client.get("/openapi.json")).json()
    for path in (
        "/api/v2/predict",
        "/api/v1/predict",
        "/v2/models/{model}/infer",
        "/v2/models/{model}/versions/{version}/infer",
    ):
        names = {p["name"] for p in document["paths"][path]["post"]["parameters"]}
        assert "X-Request-Timeout" in names, path
    infer = document["paths"]["/v2/models/{model}/infer"]["post"]
    assert "application/msgpack" in infer["requestBody"]["content"]


async def test_routes_behind_a_key_document_their_503(app_client, make_settings) -> None:
    """The key store (Redis) unreachable answers 503 on every route behind a key."""
    client = await app_client(make_settings())
    document = await (await client.get("/openapi.json")).json()
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            if operation.get("security") != []:
                assert "503" in operation["responses"], (method, path)


async def test_every_documented_error_answer_has_a_body_schema(app_client, make_settings) -> None:
    """A problem document, unless the route answers its own type (readiness): then
    that type, or, for a status a malformed request gets too (OIP's 400), either."""
    client = await app_client(make_settings())
    document = await (await client.get("/openapi.json")).json()
    problem = {"$ref": "#/components/schemas/Problem"}
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if int(status) >= 400:
                    schemas = [media["schema"] for media in response["content"].values()]
                    assert all(schema == schemas[0] for schema in schemas), (method, path, status)
                    if "ready" not in path:
                        assert schemas[0] == problem, (method, path, status)
                    elif "anyOf" in schemas[0]:
                        assert schemas[0]["anyOf"][1] == problem, (method, path, status)


async def test_docs_page_and_its_assets_are_served_without_a_cdn(app_client, make_settings) -> None:
    client = await app_client(make_settings())
    page = await (await client.get("/docs")).text()
    assert "http" not in page.split("<body>")[1]
    asset = await client.get("/docs/static/swagger-ui-bundle.js")
    assert asset.status == 200
    # Swagger UI 5, which renders an OpenAPI 3.1 document (4 rendered none of it).
    assert b"isOAS31" in await asset.read()
    assert (await client.get("/docs/static/swagger-ui.css")).status == 200


@pytest.mark.parametrize("name", ["", "nope.js", "..%2F..%2Fpyproject.toml", "%2E%2E/README.md"])
async def test_a_docs_asset_that_is_not_there_is_a_not_found_problem(
    app_client, make_settings, name: str
) -> None:
    """Reviews: aiohttp's own 403 for the directory came out as ``/problems/internal``,
    and its 404 for a missing file as an empty octet-stream body."""
    client = await app_client(make_settings())
    response = await client.get(f"/docs/static/{name}")
    assert response.status == 404
    assert response.content_type == "application/problem+json"
    problem = await response.json(content_type=None)
    assert (problem["type"], problem["status"]) == ("/problems/not-found", 404)


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
                if status == "429" or status == "503" and path != "/ready":  # not ready: a state
                    assert "Retry-After" in headers, (method, path, status)
                if operation.get("deprecated") and status not in ("414", "431", "501", "505"):
                    assert {"Deprecation", "Sunset"} <= set(headers), (method, path, status)
    ingest = document["paths"]["/api/v2/ingest"]["post"]["responses"]
    assert {"RateLimit-Policy", "RateLimit", "Idempotent-Replayed"} <= set(ingest["202"]["headers"])
    assert "WWW-Authenticate" in ingest["401"]["headers"]
    # Every 403 sends it too, naming the scope it lacks (a review: listed on 401s only).
    assert "WWW-Authenticate" in ingest["403"]["headers"]


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


def test_aiohttps_own_errors_take_our_problem_type_for_their_status() -> None:
    """A review: types named after Python's status phrases change between Python
    versions (413, 422 in 3.13) and differ from ours (a 422 is validation-failed)."""
    from mlgate.service.http.errors import http_error

    assert http_error(422, "Unprocessable").type_uri == "/problems/validation-failed"
    assert http_error(413, "Too large").type_uri == "/problems/payload-too-large"
    assert http_error(418, "I'm a teapot").type_uri == "/problems/http-418"
    assert http_error(418, "I'm a teapot").status == 418


async def test_openapi_feature_values_carry_the_configured_range(app_client, make_settings) -> None:
    """A review: values past MLGATE_FEATURE_MAX were refused, the document said any number."""
    client = await app_client(make_settings(feature_min=-10.0, feature_max=10.0))
    document = await (await client.get("/openapi.json")).json()
    values = document["components"]["schemas"]["Record"]["properties"]["features"]["items"]
    assert (values["minimum"], values["maximum"]) == (-10.0, 10.0)


async def test_every_request_body_may_say_it_is_msgpack_by_either_name(app_client, make_settings) -> None:
    client = await app_client(make_settings())
    document = await (await client.get("/openapi.json")).json()
    bodies = [
        operation["requestBody"]["content"]
        for item in document["paths"].values()
        for operation in item.values()
        if "requestBody" in operation
    ]
    assert bodies and all({"application/msgpack", "application/x-msgpack"} <= body.keys() for body in bodies)


async def test_the_document_says_what_the_odd_answers_are(app_client, make_settings) -> None:
    """A review: OIP readiness's 400 was described as an undecodable body, a 504's
    Retry-After was left out, and the repository routes' optional bodies were required."""
    client = await app_client(make_settings())
    document = await (await client.get("/openapi.json")).json()
    ready = document["paths"]["/v2/health/ready"]["get"]["responses"]["400"]
    assert ready["description"].startswith("Not ready; or malformed request")
    infer = document["paths"]["/api/v2/predict"]["post"]["responses"]
    assert "Retry-After" in infer["504"]["headers"]
    for path in ("/v2/repository/index", "/v2/repository/models/{model}/load"):
        assert document["paths"][path]["post"]["requestBody"]["required"] is False
    assert document["paths"]["/api/v2/predict"]["post"]["requestBody"]["required"] is True



async def test_the_document_is_sent_gzipped_to_a_client_that_takes_gzip(app_client, make_settings) -> None:
    """160 KB a slow reader held in its connection's buffer, on a route open to all."""
    client = await app_client(make_settings())
    plain = await client.get("/openapi.json", headers={"Accept-Encoding": "identity"})
    assert "Content-Encoding" not in plain.headers
    expected = await plain.read()
    zipped = await client.get("/openapi.json", headers={"Accept-Encoding": "br;q=0.5, gzip"}, auto_decompress=False)
    assert zipped.headers["Content-Encoding"] == "gzip"
    assert "Accept-Encoding" in zipped.headers["Vary"]
    compressed = await zipped.read()
    assert len(compressed) * 5 < len(expected)
    assert gzip.decompress(compressed) == expected


@pytest.mark.parametrize(
    ("accept_encoding", "takes"),
    [
        ("gzip", True),
        ("x-gzip", True),
        ("deflate, GZIP;q=0.1", True),
        ("*", True),
        ("gzip;q=0", False),
        ("gzip;q=0.0, identity", False),
        ("gzip;q=x", False),
        ("*;q=0, gzip", True),
        ("x-gzip;q=0, gzip", True),
        ("gzip; q=0.5; x=1", True),
        ("gzip;foo=1;q=0", False),
        ("gzip;q=0, *", False),
        ("br, deflate", False),
        ("", False),
    ],
)
def test_what_takes_gzip_is_read_as_rfc_9110_says(accept_encoding: str, takes: bool) -> None:
    assert accepts_gzip(accept_encoding) is takes


async def test_every_operation_documents_the_answers_any_request_may_get(app_client, make_settings) -> None:
    """A review: 417, 431 and 505 came from every route and were documented on none
    (417 on those with a body only), 400 on no GET route; then 501 on POST only."""
    client = await app_client(make_settings())
    document = await (await client.get("/openapi.json")).json()
    for path, item in document["paths"].items():
        for method, operation in item.items():
            statuses = set(operation["responses"])
            assert {"400", "414", "417", "431", "505"} <= statuses, (method, path)
            assert "501" in statuses, (method, path)  # the door's, on any method
    assert "405" in document["info"]["description"] and "HEAD" in document["info"]["description"]


async def test_the_binary_tensor_extension_is_documented_as_bytes_both_ways(app_client, make_settings) -> None:
    """A review: its request was documented as the JSON InferenceRequest, and its
    octet-stream answer and Inference-Header-Content-Length not at all."""
    client = await app_client(make_settings())
    document = await (await client.get("/openapi.json")).json()
    infer = document["paths"]["/v2/models/{model}/infer"]["post"]
    binary = infer["requestBody"]["content"]["application/octet-stream"]["schema"]
    assert binary["type"] == "string" and binary["contentMediaType"] == "application/octet-stream"
    assert "$ref" in infer["requestBody"]["content"]["application/json"]["schema"]
    answer = infer["responses"]["200"]
    assert answer["content"]["application/octet-stream"]["schema"] == binary
    assert "Inference-Header-Content-Length" in answer["headers"]


async def test_answers_that_are_no_wire_type_name_their_media_type(app_client, make_settings) -> None:
    client = await app_client(make_settings())
    document = await (await client.get("/openapi.json")).json()
    for path, media in (("/metrics", "text/plain"), ("/docs", "text/html"), ("/openapi.json", "application/json")):
        content = document["paths"][path]["get"]["responses"]["200"]["content"]
        assert [name.split(";")[0] for name in content] == [media], path
        served = await client.get(path)
        assert served.content_type == media


async def test_a_route_open_to_any_key_documents_no_403(app_client, make_settings) -> None:
    client = await app_client(make_settings())
    document = await (await client.get("/openapi.json")).json()
    responses = document["paths"]["/v2"]["get"]["responses"]
    assert "401" in responses and "403" not in responses


@pytest.mark.parametrize(
    ("value", "taken"), [("1.5", True), ("600000", True), ("1e3", False), ("1000.", False), ("-5", False)]
)
async def test_x_request_timeout_is_documented_as_the_text_the_server_takes(
    app_client, make_settings, value: str, taken: bool
) -> None:
    """A review: documented as any number, while ``1e3`` is refused 400."""
    client = await app_client(make_settings())
    document = await (await client.get("/openapi.json")).json()
    parameters = document["paths"]["/api/v2/predict"]["post"]["parameters"]
    (timeout,) = [p for p in parameters if p["name"] == "X-Request-Timeout"]
    assert (re.search(timeout["schema"]["pattern"], value) is not None) is taken
    assert (timeout_ms_in({"X-Request-Timeout": value}, 1000.0) is not None) is taken


async def test_the_answers_a_review_found_undocumented_are_documented_as_sent(app_client, make_settings) -> None:
    """A review: a predict body of neither or both of features and instances was valid
    by the document (refused 422); ``/openapi.json``'s body was documented a string;
    OIP readiness's 400 to a malformed request was not its documented type; v1's
    deprecation headers were listed on the parser's answers, and /ready's Retry-After
    on its 503, where neither is sent."""
    client = await app_client(make_settings())
    document = await (await client.get("/openapi.json")).json()
    paths = document["paths"]
    body = paths["/api/v2/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert [branch["required"] for branch in body["oneOf"]] == [["features"], ["instances"]]
    assert paths["/openapi.json"]["get"]["responses"]["200"]["content"]["application/json"]["schema"] == {
        "type": "object"
    }
    ready = paths["/v2/health/ready"]["get"]["responses"]["400"]["content"]["application/json"]["schema"]
    assert ready["anyOf"][1] == {"$ref": "#/components/schemas/Problem"}
    v1 = paths["/api/v1/predict"]["post"]["responses"]
    assert "Deprecation" not in v1["414"]["headers"] and "Deprecation" in v1["422"]["headers"]
    assert "Retry-After" not in paths["/ready"]["get"]["responses"]["503"]["headers"]
