"""The example catalog validates; a broken catalog names the file, the line, the field and the problem."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from libs.contracts.catalog import Catalog, Kind
from libs.contracts.catalog_file import CatalogError, load_catalog
from libs.contracts.events import Priority

pytestmark = pytest.mark.unit

GOOD = """\
version: 1
fallback_department: service-desk
departments:
  - slug: service-desk
    name: Service Desk
  - slug: it
    name: IT
    timezone: Europe/Paris
    categories: [hardware]
    sla:
      high: {accept_within: 1h, resolve_within: 1d}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "catalog.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def error_for(tmp_path: Path, text: str) -> CatalogError:
    path = write(tmp_path, text)
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    assert str(path) in str(info.value)
    return info.value


def test_example_catalog_validates(catalog_path: Path) -> None:
    catalog = load_catalog(catalog_path)
    assert set(catalog.slugs) >= {"marketing", "finance", "it", "legal", "facilities", "hr", "acme-it", "service-desk"}
    assert catalog.fallback_department == "service-desk"
    vendor = catalog.get("acme-it")
    assert vendor is not None
    assert vendor.kind is Kind.VENDOR
    legal = catalog.get("legal")
    assert legal is not None
    assert legal.timezone == "America/New_York"
    for department in catalog.departments:
        assert set(department.sla) == set(Priority), department.slug
        for target in department.sla.values():
            assert timedelta(0) < target.accept_within <= target.resolve_within, department.slug


def test_example_catalog_is_plain_yaml_for_the_contract(catalog_path: Path) -> None:
    """What the services' own loaders do: safe_load + model_validate, nothing else."""
    Catalog.model_validate(yaml.safe_load(catalog_path.read_text(encoding="utf-8")))


def test_minimal_catalog_loads(tmp_path: Path) -> None:
    assert load_catalog(write(tmp_path, GOOD)).slugs == ["service-desk", "it"]


def test_bad_slug_names_field_and_line(tmp_path: Path) -> None:
    error = error_for(tmp_path, GOOD.replace("slug: it", "slug: IT Ops"))
    [problem] = error.problems
    assert problem.path == "departments[1].slug"
    assert problem.line == 6
    assert "'IT Ops'" in problem.message
    assert f"{tmp_path / 'catalog.yaml'}:6: departments[1].slug" in str(error)


def test_unknown_timezone(tmp_path: Path) -> None:
    error = error_for(tmp_path, GOOD.replace("Europe/Paris", "Mars/Olympus_Mons"))
    [problem] = error.problems
    assert problem.path == "departments[1].timezone (department 'it')"
    assert problem.line == 8
    assert "unknown time zone 'Mars/Olympus_Mons'" in problem.message


def test_fallback_not_in_catalog(tmp_path: Path) -> None:
    error = error_for(tmp_path, GOOD.replace("fallback_department: service-desk", "fallback_department: triage"))
    [problem] = error.problems
    assert "fallback_department 'triage' is not a department in the catalog" in problem.message


def test_bad_duration(tmp_path: Path) -> None:
    error = error_for(tmp_path, GOOD.replace("accept_within: 1h", "accept_within: soon"))
    [problem] = error.problems
    assert problem.path == "departments[1].sla.high.accept_within (department 'it')"
    assert problem.line == 11
    assert "'soon' is not a duration" in problem.message


def test_every_error_is_listed(tmp_path: Path) -> None:
    text = GOOD.replace("slug: it", "slug: X").replace("Europe/Paris", "Nowhere/City") + "    colour: blue\n"
    error = error_for(tmp_path, text)
    paths = {p.path.split(" ")[0] for p in error.problems}
    assert paths == {"departments[1].slug", "departments[1].timezone", "departments[1].colour"}
    assert str(error).count(str(tmp_path / "catalog.yaml")) == 4  # the header and one line per error


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "the file is empty"),
        ("departments: [unclosed\n", "not valid YAML"),
        ("- just\n- a list\n", "valid dictionary"),
    ],
)
def test_unreadable_catalogs(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in str(error_for(tmp_path, text))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="cannot read"):
        load_catalog(tmp_path / "absent.yaml")
