"""Search as the platform does it: FHIR token escaping, OR lists, `_sort`, `_count`, the router's raw query form.

The ACSN cases show which resources each query form finds: the official router's raw
`identifier=<system>%7C<ACSN>` and a client's escaped `identifier=<system>|<ACSN with \\, \\$>`.
Resources are put straight into the store (search is under test here, not the create rules).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient

from simulator.app import create_app
from simulator.config import SimulatorConfig
from simulator.platform import Platform
from simulator.search import SearchError, Token, parse, parse_token, split_or, unescape
from simulator.store import Store

ORG = "100099001"
ACSN_SYSTEM = f"http://sys-ids.kemkes.go.id/acsn/{ORG}"


@dataclass
class Api:
    store: Store
    client: TestClient
    token: str

    def get(self, path_and_query: str) -> Any:
        """GET exactly this path and query string (as the router writes it) under /fhir-r4/v1."""
        return self.client.get(f"/fhir-r4/v1/{path_and_query}", headers={"Authorization": f"Bearer {self.token}"})

    def imaging_study(self, acsn: str) -> dict[str, Any]:
        return self.store.create(
            {
                "resourceType": "ImagingStudy",
                "identifier": [{"use": "usual", "system": ACSN_SYSTEM, "value": acsn}],
                "status": "available",
            }
        )


@pytest.fixture
def api() -> Iterator[Api]:
    config = SimulatorConfig(org_id=ORG)
    store = Store()
    token, _ = store.issue_token(config.client_id, 600)
    with TestClient(create_app(Platform(config, store))) as client:
        yield Api(store, client, token)
    store.close()


def router_query(acsn: str, resource_type: str = "ImagingStudy") -> str:
    """The official router's query, character for character (observed_contracts.md): ACSN raw, `|` as %7C."""
    return f"{resource_type}?identifier={ACSN_SYSTEM}%7C{acsn}&_sort=-_lastUpdated&_count=1"


def found_values(bundle: dict[str, Any]) -> list[str]:
    return [entry["resource"]["identifier"][0]["value"] for entry in bundle.get("entry", [])]


# --- parsing -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "pieces"),
    [
        ("A,B", ["A", "B"]),
        ("A\\,B", ["A\\,B"]),
        ("A$B", ["A$B"]),
        ("sys|A,sys|B", ["sys|A", "sys|B"]),
        ("A\\\\,B", ["A\\\\", "B"]),  # an escaped backslash does not escape the comma after it
        ("A,", ["A", ""]),
    ],
)
def test_split_or_splits_on_unescaped_commas_only(raw: str, pieces: list[str]) -> None:
    assert split_or(raw) == pieces


@pytest.mark.parametrize(
    ("raw", "value"),
    [("A\\,B", "A,B"), ("A\\$B", "A$B"), ("A\\|B", "A|B"), ("A\\\\B", "A\\B"), ("A\\B", "A\\B"), ("A\\", "A\\")],
)
def test_unescape_takes_the_four_fhir_escapes_and_keeps_other_backslashes(raw: str, value: str) -> None:
    assert unescape(raw) == value


@pytest.mark.parametrize(
    ("raw", "token"),
    [
        ("sys|A", Token("sys", "A")),
        ("sys|A|B", Token("sys", "A|B")),  # the first unescaped bar splits
        ("sys\\|x|A", Token("sys|x", "A")),
        ("|A", Token("", "A")),
        ("sys|", Token("sys", None)),
        ("A", Token(None, "A")),
        ("sys|A$B", Token("sys", "A$B")),  # identifier is not composite: `$` is literal
    ],
)
def test_parse_token_splits_system_and_value_at_the_first_unescaped_bar(raw: str, token: Token) -> None:
    assert parse_token(raw) == token


# --- the router's exact query form ------------------------------------------------------------------------------


def test_the_routers_query_for_a_plain_acsn_answers_a_searchset_as_the_platform(api: Api) -> None:
    api.imaging_study("ACC0001")
    newest = api.imaging_study("ACC0001")
    api.imaging_study("ACC0002")
    response = api.get(router_query("ACC0001"))
    assert response.status_code == 200
    assert "identifier=http://sys-ids.kemkes.go.id/acsn/100099001%7CACC0001&" in str(response.request.url)
    bundle = response.json()
    assert (bundle["resourceType"], bundle["type"], bundle["total"]) == ("Bundle", "searchset", 2)
    [entry] = bundle["entry"]  # _count=1
    assert entry["resource"]["id"] == newest["id"]  # _sort=-_lastUpdated
    assert entry["fullUrl"].endswith(f"/fhir-r4/v1/ImagingStudy/{newest['id']}")
    assert entry["search"] == {"mode": "match"}


def test_a_raw_comma_in_the_routers_query_searches_two_values_not_the_acsn(api: Api) -> None:
    """`ACC,1` sent raw is `ACC` OR `1`: the study holding `ACC,1` is not found, those holding the pieces are."""
    api.imaging_study("ACC,1")
    piece = api.imaging_study("ACC")
    response = api.get(router_query("ACC,1"))
    assert "%7CACC,1&" in str(response.request.url)  # sent as the router sends it: the comma raw
    raw = response.json()
    assert (raw["total"], found_values(raw)) == (1, ["ACC"])
    assert raw["entry"][0]["resource"]["id"] == piece["id"]
    escaped = api.get(f"ImagingStudy?identifier={ACSN_SYSTEM}|ACC\\,1&_sort=-_lastUpdated").json()
    assert (escaped["total"], found_values(escaped)) == (1, ["ACC,1"])


def test_a_raw_comma_finds_nothing_when_no_piece_is_an_acsn(api: Api) -> None:
    """What the router meets for `ACC,2`: an empty searchset, so it reports "ServiceRequest not found"."""
    api.imaging_study("ACC,2")
    bundle = api.get(router_query("ACC,2")).json()
    assert {k: v for k, v in bundle.items() if k != "link"} == {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": 0,
    }


def test_the_pieces_of_a_raw_comma_are_ored_and_a_bare_piece_matches_any_system(api: Api) -> None:
    """`<system>|A,B`: the second piece has no `|`, so it is a value in any system (FHIR token semantics)."""
    api.imaging_study("A")
    other = api.store.create(
        {"resourceType": "ImagingStudy", "identifier": [{"system": "urn:other", "value": "B"}], "status": "available"}
    )
    bundle = api.get(f"ImagingStudy?identifier={ACSN_SYSTEM}%7CA,B&_sort=-_lastUpdated").json()
    assert bundle["total"] == 2
    assert bundle["entry"][0]["resource"]["id"] == other["id"]  # newest first across both pieces


@pytest.mark.parametrize("form", ["raw", "escaped"])
def test_a_dollar_is_literal_in_both_forms(api: Api, form: str) -> None:
    """identifier is a token, not a composite parameter: `$` splits nothing, raw or escaped it is the ACSN's."""
    api.imaging_study("ACC$1")
    api.imaging_study("ACC")
    api.imaging_study("1")
    query = router_query("ACC$1") if form == "raw" else f"ImagingStudy?identifier={ACSN_SYSTEM}|ACC\\$1"
    bundle = api.get(query).json()
    assert (bundle["total"], found_values(bundle)) == (1, ["ACC$1"])


def test_an_escaped_bar_and_backslash_are_part_of_the_value(api: Api) -> None:
    api.imaging_study("A|B")
    api.imaging_study("C\\D")
    assert found_values(api.get(f"ImagingStudy?identifier={ACSN_SYSTEM}|A\\|B").json()) == ["A|B"]
    assert found_values(api.get(f"ImagingStudy?identifier={ACSN_SYSTEM}|C\\\\D").json()) == ["C\\D"]
    assert found_values(api.get(router_query("C\\D")).json()) == ["C\\D"]  # `\D` is no escape: kept


def test_system_only_and_no_system_tokens(api: Api) -> None:
    api.imaging_study("X1")
    api.store.create({"resourceType": "ImagingStudy", "identifier": [{"value": "X1"}], "status": "available"})
    assert api.get(f"ImagingStudy?identifier={ACSN_SYSTEM}|").json()["total"] == 1
    no_system = api.get("ImagingStudy?identifier=|X1").json()
    assert no_system["total"] == 1 and "system" not in no_system["entry"][0]["resource"]["identifier"][0]
    assert api.get("ImagingStudy?identifier=X1").json()["total"] == 2


# --- _sort and _count ---------------------------------------------------------------------------------------------


def test_sort_by_last_updated_both_ways_and_count_limits_entries_not_total(api: Api) -> None:
    ids = [api.imaging_study("SORT1")["id"] for _ in range(3)]
    base = f"ImagingStudy?identifier={ACSN_SYSTEM}%7CSORT1"
    newest = api.get(f"{base}&_sort=-_lastUpdated").json()
    assert [e["resource"]["id"] for e in newest["entry"]] == ids[::-1]
    oldest = api.get(f"{base}&_sort=_lastUpdated&_count=2").json()
    assert [e["resource"]["id"] for e in oldest["entry"]] == ids[:2]
    assert oldest["total"] == 3
    counted = api.get(f"{base}&_count=0").json()
    assert counted["total"] == 3 and "entry" not in counted
    assert [e["resource"]["id"] for e in api.get(base).json()["entry"]] == ids[::-1]  # default: newest first


@pytest.mark.parametrize(
    ("query", "parameter"), [("_count=-1", "_count"), ("_count=x", "_count"), ("_sort=_id", "_sort")]
)
def test_an_unsupported_sort_or_count_is_refused_naming_the_parameter(api: Api, query: str, parameter: str) -> None:
    response = api.get(f"ImagingStudy?identifier=A&{query}")
    assert response.status_code == 400
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert parameter in outcome["issue"][0]["details"]["text"]
    with pytest.raises(SearchError) as caught:
        parse([("identifier", "A"), tuple(query.split("=", 1))])  # type: ignore[list-item]
    assert caught.value.parameter == parameter


def test_other_filters_take_or_lists_too(api: Api) -> None:
    first = api.store.create(
        {"resourceType": "ServiceRequest", "subject": {"reference": "Patient/P1"}, "status": "active"}
    )
    second = api.store.create(
        {"resourceType": "ServiceRequest", "subject": {"reference": "Patient/P2"}, "status": "active"}
    )
    assert api.get("ServiceRequest?subject=Patient/P1,P2").json()["total"] == 2
    assert api.get(f"ServiceRequest?_id={first['id']},{second['id']}&subject=P2").json()["total"] == 1
