"""The API key the client sends: the one given, else ``$MLGATE_API_KEY``, without the
blanks around it; one no header can carry is refused when the client is made."""

from __future__ import annotations

import pytest
from mlgate_client import Predictor, Producer

from tests.client.scripted import Scripted, accepted


async def test_a_key_read_with_its_newline_is_sent_without_it(scripted: Scripted) -> None:
    """A key read with ``open(...).read()`` keeps its newline (a review)."""
    scripted.script = [accepted]
    async with Producer(scripted.url, "s", api_key="mlg_0123456789abcdef_secret\n") as producer:
        await (await producer.send([0.5] * 4))
    headers, _ = scripted.seen[0]
    assert headers["Authorization"] == "Bearer mlg_0123456789abcdef_secret"


@pytest.mark.parametrize("key", ["mlg_a\x00b", "mlg_a\nb", "mlg_ä"], ids=["nul", "newline-inside", "non-ascii"])
def test_a_key_no_header_can_carry_is_refused_when_the_client_is_made(key: str) -> None:
    """A review: a control character in the key failed every request with aiohttp's
    own ``ValueError`` (a predictor), or a crashed batch (a producer)."""
    with pytest.raises(ValueError, match="API key"):
        Predictor("http://127.0.0.1:8080", api_key=key)
    with pytest.raises(ValueError, match="API key"):
        Producer("http://127.0.0.1:8080", "s", api_key=key)


def test_a_key_from_the_environment_is_trimmed_too(monkeypatch: pytest.MonkeyPatch) -> None:
    from mlgate_client.transport import resolve_api_key

    monkeypatch.setenv("MLGATE_API_KEY", "  mlg_0123456789abcdef_secret\r\n")
    assert resolve_api_key(None) == "mlg_0123456789abcdef_secret"


@pytest.mark.parametrize("given", ["flag", "environment"])
def test_the_cli_refuses_a_bad_key_as_a_usage_error_before_sending(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path, given: str
) -> None:
    """A review: a key with a tab printed a traceback and exited 1 ("some could not be
    delivered"); bad arguments exit 2 with a message, before anything is sent."""
    from mlgate_client.cli import main

    records = tmp_path / "records.ndjson"
    records.write_text('{"features": [1.0]}\n')
    args = ["send", str(records), "--url", "http://127.0.0.1:9", "--source", "s"]
    if given == "flag":
        args += ["--api-key", "mlg_x\tsecret"]
    else:
        monkeypatch.setenv("MLGATE_API_KEY", "mlg_x\tsecret")
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 2
    assert "API key" in capsys.readouterr().err
