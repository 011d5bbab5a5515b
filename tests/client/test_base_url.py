"""A base URL that is not ``http(s)://host`` is refused when the client is made, not
retried as a connection error for the whole budget."""

from __future__ import annotations

import pytest
from mlgate_client import Predictor, Producer


@pytest.mark.parametrize("url", ["127.0.0.1:18461", "localhost:8080", "ftp://mlgate", "http://"])
async def test_a_producer_refuses_a_url_without_http_and_a_host(url: str) -> None:
    """A review: ``127.0.0.1:18461`` (no scheme) failed each attempt as a connection
    error and was retried for 120 s."""
    with pytest.raises(ValueError, match="http"):
        Producer(url, "s")


async def test_a_predictor_refuses_a_url_without_a_scheme() -> None:
    with pytest.raises(ValueError, match="http"):
        Predictor("127.0.0.1:18461")
