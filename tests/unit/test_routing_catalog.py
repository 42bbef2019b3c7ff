"""Routing's catalog loader: errors name the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.routing.catalog import CatalogError, load_catalog

pytestmark = pytest.mark.unit

GOOD = """
fallback_department: desk
departments:
  - {slug: desk, name: Desk, categories: [general]}
  - {slug: it, name: IT, categories: [laptop], sla: {normal: {accept_within: 4h, resolve_within: 2d}}}
"""


def test_loads_a_valid_catalog(tmp_path: Path) -> None:
    path = tmp_path / "catalog.yaml"
    path.write_text(GOOD)
    catalog = load_catalog(path)
    assert catalog.slugs == ["desk", "it"]


def test_loads_the_example_catalog(catalog_path: Path) -> None:
    catalog = load_catalog(catalog_path)
    assert catalog.get(catalog.fallback_department) is not None


def test_invalid_field_names_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / "catalog.yaml"
    path.write_text(GOOD.replace("name: IT,", "name: IT, timezone: Mars/Base,"))
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    text = str(info.value)
    assert str(path) in text
    assert "departments[1].timezone: unknown time zone 'Mars/Base'" in text


def test_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(CatalogError, match=r"absent\.yaml"):
        load_catalog(path)


@pytest.mark.parametrize(("text", "needle"), [("departments: [", "not valid YAML"), ("", "must be a mapping")])
def test_not_a_catalog_document(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "catalog.yaml"
    path.write_text(text)
    with pytest.raises(CatalogError, match=needle):
        load_catalog(path)
