"""Every setting is described, and .env.example and the README say what the code does."""

from __future__ import annotations

import msgspec

from mlgate.config import Settings, reference
from tests.service_process import REPO

ROOT = REPO


def test_every_setting_has_a_description() -> None:
    fields = {f.name for f in msgspec.structs.fields(Settings)}
    assert set(reference.DESCRIPTIONS) == fields


def test_env_example_is_the_rendered_reference() -> None:
    assert (ROOT / ".env.example").read_text() == reference.env_example()


def test_readme_configuration_table_is_the_rendered_reference() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme.split("<!-- settings:begin -->\n")[1].split("<!-- settings:end -->")[0]
    assert table == reference.markdown_table()
