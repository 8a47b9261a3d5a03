"""fmserve.protocol.scim: filters, sorting, paging, projection, PATCH and body checks."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest

from fmserve.errors import ScimError
from fmserve.protocol.scim import (
    GROUP_ATTRIBUTES,
    GROUP_SCHEMAS,
    LIST_SCHEMA,
    PATCH_SCHEMA,
    SP_SCHEMAS,
    USER_SCHEMAS,
    apply_patch,
    check_resource,
    list_response,
    parse_filter,
    parse_paging,
    project,
    query,
    sort_resources,
)

ALICE: dict[str, Any] = {
    "id": "7610385418203920", "userName": "Alice@Example.com", "displayName": "Alice Smith",
    "active": True,
    "emails": [{"value": "alice@example.com", "primary": True, "type": "work"},
               {"value": "al@home.org", "type": "home"}],
    "name": {"givenName": "Alice", "familyName": "Smith"},
    "entitlements": [{"value": "workspace-access"}],
    "groups": [{"value": "111", "display": "users", "$ref": "Groups/111"}],
    "roles": [], "externalId": None, "schemas": USER_SCHEMAS,
}
BOB: dict[str, Any] = {
    "id": "42", "userName": "bob@corp.io", "displayName": "Bob", "active": False,
    "emails": [{"value": "bob@corp.io", "primary": True, "type": "work"}],
    "groups": [{"value": "222", "display": "admins", "$ref": "Groups/222"}],
    "externalId": "ext-9", "schemas": USER_SCHEMAS, "score": 7,
}
GROUP: dict[str, Any] = {
    "id": "111", "displayName": "users",
    "members": [{"value": "7610385418203920", "display": "Alice Smith",
                 "$ref": "Users/7610385418203920"},
                {"value": "42", "display": "Bob", "$ref": "Users/42"}],
    "meta": {"resourceType": "WorkspaceGroup"}, "schemas": GROUP_SCHEMAS,
}


def scim_error(exc: pytest.ExceptionInfo[ScimError]) -> tuple[int, str | None]:
    return exc.value.status_code, exc.value.scim_type


# ---- filters ---------------------------------------------------------------------------

@pytest.mark.parametrize("expr, alice, bob", [
    ('userName eq "alice@example.com"', True, False),         # case-insensitive value
    ('USERNAME EQ "bob@corp.io"', False, True),               # attribute and op names too
    ('userName ne "alice@example.com"', False, True),
    ('userName co "EXAMPLE"', True, False),
    ('userName sw "bob@"', False, True),
    ('userName ew ".io"', False, True),
    ('displayName gt "Alice Smith"', False, True),
    ('displayName ge "Alice Smith"', True, True),
    ('displayName lt "Bob"', True, False),
    ('displayName le "bob"', True, True),
    ('score gt 5', False, True),
    ('score ge 7.0', False, True),
    ('score lt 7', False, False),
    ('score le 7', False, True),
    ('score eq "7"', False, False),                           # no coercion across types
    ('active eq true', True, False),
    ('active eq false', False, True),
    ('active eq 1', False, False),                            # a number is not a boolean
    ('externalId pr', False, True),                           # null is not present
    ('roles pr', False, False),                               # [] is not present
    ('missing pr', False, False),
    ('missing ne "x"', True, True),                           # missing: ne true
    ('missing eq "x"', False, False),
    ('externalId eq null', True, False),
    ('externalId ne null', False, True),
    ('id eq "42"', False, True),
    ('emails.value eq "AL@HOME.ORG"', True, False),           # any element of a list
    ('emails.type eq "home"', True, False),
    ('emails eq "bob@corp.io"', False, True),                 # list compares by "value"
    ('groups.display eq "Admins"', False, True),
    ('groups eq "111"', True, False),
    ('name.givenName sw "al"', True, False),
    ('name.familyName pr', True, False),
    ('urn:ietf:params:scim:schemas:core:2.0:User:userName sw "alice"', True, False),
    ('emails[type eq "work" and value co "corp"]', False, True),
    ('emails[type eq "home"] and active eq true', True, False),
    ('emails[primary eq true]', True, True),
    # and binds tighter than or
    ('active eq false or userName sw "alice" and displayName eq "nobody"', False, True),
    ('(active eq false or userName sw "alice") and displayName eq "nobody"', False, False),
    ('active eq true and userName sw "a" or id eq "42"', True, True),
    ('not (active eq true)', False, True),
    ('not(id eq "42") and not (userName co "zz")', True, False),
    ('((((id eq "42"))))', False, True),
    ('userName eq "Alice@Example.com" or userName eq "bob@corp.io"', True, True),
    ('displayName eq "Alice\\u0020Smith"', True, False),      # JSON escapes in strings
])
def test_filter_matches(expr: str, alice: bool, bob: bool) -> None:
    flt = parse_filter(expr)
    assert (flt.matches(ALICE), flt.matches(BOB)) == (alice, bob)


def test_filter_id_is_case_exact_and_escapes() -> None:
    assert parse_filter('id eq "ABC"').matches({"id": "ABC"})
    assert not parse_filter('id eq "abc"').matches({"id": "ABC"})
    assert parse_filter('userName eq "abc"').matches({"userName": "ABC"})
    assert parse_filter(r'displayName eq "say \"hi\"\\"').matches({"displayName": 'say "hi"\\'})


def test_filter_group_membership() -> None:
    assert parse_filter('members eq "42"').matches(GROUP)
    assert parse_filter('members.value eq "7610385418203920"').matches(GROUP)
    assert not parse_filter('members eq "43"').matches(GROUP)
    assert parse_filter('members[display sw "bo"]').matches(GROUP)
    assert parse_filter('displayName eq "USERS"').matches(GROUP)
    assert not parse_filter('members pr').matches({"id": "1", "members": []})


@pytest.mark.parametrize("expr", [
    "", "   ", 'userName eq "unterminated', 'userName foo "x"', "userName eq",
    'userName eq "x" garbage', 'userName eq "x" and', "and", "(userName pr", "userName pr)",
    "not userName pr", 'userName eq bare', '"x" eq userName', 'a.b.c eq "x"',
    'userName eq "x" or or id pr', 'userName co 5', 'score gt true', 'score lt null',
    'emails[type eq "work"', 'emails[type[x eq "1"] eq "2"]', 'a.b[value eq "1"]',
    'userName eq "bad \\q escape"', 'userName eq "raw\ncontrol"', "userName eq #",
    "x" * 10_000, 'userName eq "' + "x" * 4100 + '"',
    "(" * 200 + "id pr" + ")" * 200, "not(" * 100 + "id pr" + ")" * 100,
    ("id pr and " * 500) + "id pr",
])
def test_malformed_filters(expr: str) -> None:
    with pytest.raises(ScimError) as exc:
        parse_filter(expr)
    assert scim_error(exc) == (400, "invalidFilter")
    assert exc.value.to_body()["scimType"] == "invalidFilter"


def test_filter_bounds_allow_reasonable_input() -> None:
    assert parse_filter("(" * 30 + 'id eq "42"' + ")" * 30).matches(BOB)
    long_or = " or ".join(f'id eq "{i}"' for i in range(250))
    assert len(long_or) < 4096 and parse_filter(long_or).matches(BOB)


def test_filter_rejects_non_string() -> None:
    with pytest.raises(ScimError) as exc:
        parse_filter(123)  # type: ignore[arg-type]
    assert scim_error(exc) == (400, "invalidFilter")


# ---- sorting ---------------------------------------------------------------------------

PEOPLE: list[dict[str, Any]] = [{"id": "1", "userName": "carol"}, {"id": "2", "userName": "Alice"},
          {"id": "3"}, {"id": "4", "userName": "bob"}, {"id": "5", "userName": "alice"},
          {"id": "6", "userName": None}]


def ids(resources: list[dict[str, Any]]) -> list[str]:
    return [r["id"] for r in resources]


def test_sort_ascending_descending_missing_last_stable() -> None:
    assert ids(sort_resources(PEOPLE, "userName", None)) == ["2", "5", "4", "1", "3", "6"]
    assert ids(sort_resources(PEOPLE, "USERNAME", "ascending")) == ["2", "5", "4", "1", "3", "6"]
    assert ids(sort_resources(PEOPLE, "userName", "Descending")) == ["1", "4", "2", "5", "3", "6"]
    assert ids(sort_resources(PEOPLE, None, None)) == ["1", "2", "3", "4", "5", "6"]
    assert ids(sort_resources(PEOPLE, "nothing", "descending")) == ids(PEOPLE)
    assert PEOPLE[0]["id"] == "1"  # input untouched


def test_sort_by_sub_attribute_and_multi_valued_primary() -> None:
    users: list[dict[str, Any]] = [
        {"id": "a", "name": {"familyName": "Zed"},
         "emails": [{"value": "z@x"}, {"value": "a@x", "primary": True}]},
        {"id": "b", "name": {"familyName": "abe"}, "emails": [{"value": "m@x"}]}]
    assert ids(sort_resources(users, "name.familyName", None)) == ["b", "a"]
    assert ids(sort_resources(users, "emails", None)) == ["a", "b"]  # primary a@x first
    assert ids(sort_resources(users, "emails.value", "descending")) == ["b", "a"]


@pytest.mark.parametrize("by, order", [("userName", "up"), ("userName", "ASC"),
                                       ("user name", None), ("a.b.c", None)])
def test_sort_bad_arguments(by: str, order: str | None) -> None:
    with pytest.raises(ScimError) as exc:
        sort_resources(PEOPLE, by, order)
    assert scim_error(exc) == (400, "invalidValue")


# ---- projection ------------------------------------------------------------------------

def test_project_attributes() -> None:
    out = project(ALICE, "userName, name.givenName,emails.value,bogus", None)
    assert out == {"id": ALICE["id"], "schemas": USER_SCHEMAS, "userName": "Alice@Example.com",
                   "name": {"givenName": "Alice"},
                   "emails": [{"value": "alice@example.com"}, {"value": "al@home.org"}]}
    out["schemas"].append("x")
    assert ALICE["schemas"] == USER_SCHEMAS  # a deep copy
    assert project(ALICE, "DISPLAYNAME", None) == {
        "id": ALICE["id"], "schemas": USER_SCHEMAS, "displayName": "Alice Smith"}
    assert project(ALICE, "urn:ietf:params:scim:schemas:core:2.0:User:active", None)["active"]
    assert project(GROUP, "members.display", None)["members"] == [
        {"display": "Alice Smith"}, {"display": "Bob"}]
    assert "members" not in project(GROUP, "members.nothing", None)


def test_project_excluded_attributes() -> None:
    out = project(GROUP, None, "members, id, meta")
    assert out == {"id": "111", "displayName": "users", "schemas": GROUP_SCHEMAS}
    out = project(ALICE, None, "emails.type,name.familyName,schemas")
    assert out["emails"] == [{"value": "alice@example.com", "primary": True},
                             {"value": "al@home.org"}]
    assert out["name"] == {"givenName": "Alice"} and out["schemas"] == USER_SCHEMAS
    assert project(ALICE, None, None) == ALICE
    assert project(ALICE, "userName,emails", "emails") == {
        "id": ALICE["id"], "schemas": USER_SCHEMAS, "userName": "Alice@Example.com"}


# ---- paging ----------------------------------------------------------------------------

def test_list_response_shape_and_bounds() -> None:
    rs = [{"id": str(i)} for i in range(5)]
    assert list_response(rs, None, None) == {
        "schemas": [LIST_SCHEMA], "totalResults": 5, "startIndex": 1, "itemsPerPage": 5,
        "Resources": rs}
    page = list_response(rs, 2, 2)
    assert (page["startIndex"], page["itemsPerPage"], ids(page["Resources"])) == (2, 2, ["1", "2"])
    assert list_response(rs, 0, 1)["Resources"] == [{"id": "0"}]
    assert list_response(rs, -5, None)["startIndex"] == 1
    assert list_response(rs, 5, 10)["Resources"] == [{"id": "4"}]
    past = list_response(rs, 6, 10)
    assert past["Resources"] == [] and past["totalResults"] == 5 and past["itemsPerPage"] == 0
    assert list_response(rs, 1, -3)["Resources"] == []
    big = [{"id": str(i)} for i in range(10_005)]
    assert list_response(big, 1, 50_000)["itemsPerPage"] == 10_000


def test_parse_paging() -> None:
    assert parse_paging({}) == (None, None)
    assert parse_paging({"startIndex": "3", "count": "10000", "filter": "x"}) == (3, 10000)
    assert parse_paging({"startindex": " -1 ", "COUNT": "+0"}) == (-1, 0)
    for bad in ({"startIndex": "one"}, {"count": "1.5"}, {"count": ""},
                {"count": "9" * 40}, {"startIndex": "0x10"}):
        with pytest.raises(ScimError) as exc:
            parse_paging(bad)
        assert scim_error(exc) == (400, "invalidValue")


def sdk_list(resources: list[dict[str, Any]], params: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """databricks-sdk's UsersAPI.list() loop, verbatim in behaviour, against query()."""
    q = dict(params)
    q["startIndex"] = 1
    if "count" not in q:
        q["count"] = 10000
    seen: set[str] = set()
    for _ in range(10_000):  # the SDK has no bound; this one fails the test instead
        json = query(resources, {k: str(v) for k, v in q.items()})
        if "Resources" in json:
            for v in json["Resources"]:
                if v["id"] in seen:
                    continue
                seen.add(v["id"])
                yield v
        if "Resources" not in json or not json["Resources"]:
            return
        q["startIndex"] += len(json["Resources"])
    raise AssertionError("the SDK's list loop did not terminate")


@pytest.mark.parametrize("n", [0, 1, 2, 5, 7])
@pytest.mark.parametrize("count", [None, 2, 3, 10000])
def test_sdk_list_loop_sees_each_resource_once_and_ends(n: int, count: int | None) -> None:
    rs = [{"id": str(i), "userName": f"u{i}@x", "schemas": USER_SCHEMAS} for i in range(n)]
    params: dict[str, Any] = {} if count is None else {"count": count}
    seen = [r["id"] for r in sdk_list(rs, params)]
    assert seen == [str(i) for i in range(n)]


def test_sdk_list_loop_with_filter_sort_and_attributes() -> None:
    rs = [{"id": str(i), "userName": f"u{i:02}@x", "active": i % 2 == 0, "schemas": USER_SCHEMAS}
          for i in range(11)]
    got = list(sdk_list(rs, {"count": 2, "filter": "active eq true", "sortBy": "userName",
                             "sortOrder": "descending", "attributes": "userName"}))
    assert [g["id"] for g in got] == ["10", "8", "6", "4", "2", "0"]
    assert got[0] == {"id": "10", "userName": "u10@x", "schemas": USER_SCHEMAS}


def test_query_errors() -> None:
    with pytest.raises(ScimError) as exc:
        query([], {"filter": "userName eq"})
    assert scim_error(exc) == (400, "invalidFilter")
    with pytest.raises(ScimError) as exc:
        query([], {"count": "many"})
    assert scim_error(exc) == (400, "invalidValue")


# ---- PATCH -----------------------------------------------------------------------------

def patch(*ops: dict[str, Any]) -> dict[str, Any]:
    return {"schemas": [PATCH_SCHEMA], "Operations": list(ops)}


def members(resource: dict[str, Any]) -> list[str]:
    return [m["value"] for m in resource["members"]]


def test_add_members_dedupes_and_does_not_mutate() -> None:
    before = copy.deepcopy(GROUP)
    out = apply_patch(GROUP, patch({"op": "add", "path": "members",
                                    "value": [{"value": "42"}, {"value": "9"}, {"value": "9"}]}))
    assert members(out) == ["7610385418203920", "42", "9"]
    assert out["members"][1] == GROUP["members"][1]  # the existing entry is kept as it was
    assert GROUP == before
    again = apply_patch(out, patch({"op": "Add", "path": "MEMBERS", "value": {"value": "9"}}))
    assert again == out  # a no-op


def test_add_single_valued_and_without_path() -> None:
    user = {"id": "1", "userName": "u@x", "schemas": USER_SCHEMAS}
    out = apply_patch(user, {"Operations": [  # schemas may be missing
        {"op": "add", "path": "displayName", "value": "U"},
        {"op": "add", "value": {"ACTIVE": False, "name.givenName": "Ann",
                                "entitlements": [{"value": "allow-cluster-create"}],
                                "urn:ietf:params:scim:schemas:core:2.0:User:externalId": "e1"}},
        {"op": "add", "path": "entitlements", "value": [{"value": "workspace-access"}]},
    ]})
    assert out == {"id": "1", "userName": "u@x", "schemas": USER_SCHEMAS, "displayName": "U",
                   "active": False, "name": {"givenName": "Ann"}, "externalId": "e1",
                   "entitlements": [{"value": "allow-cluster-create"},
                                    {"value": "workspace-access"}]}


def test_replace() -> None:
    out = apply_patch(ALICE, patch(
        {"op": "replace", "path": "emails", "value": [{"value": "new@x", "primary": True}]},
        {"op": "Replace", "path": "active", "value": "False"},  # Azure AD's string boolean
        {"op": "replace", "value": {"displayName": "Al", "name": {"familyName": "Jones"}}},
        {"op": "replace", "path": "groups[value eq \"111\"]", "value": {"value": "333"}},
    ))
    assert out["emails"] == [{"value": "new@x", "primary": True}]
    assert out["active"] is False and out["displayName"] == "Al"
    assert out["name"] == {"givenName": "Alice", "familyName": "Jones"}  # merged
    assert out["groups"] == [{"value": "333"}]
    assert ALICE["active"] is True and ALICE["emails"][0]["value"] == "alice@example.com"


def test_filtered_sub_attribute_paths() -> None:
    out = apply_patch(ALICE, patch(
        {"op": "replace", "path": 'emails[type eq "work"].value', "value": "w@x"},
        {"op": "add", "path": 'emails[type eq "other"].value', "value": "o@x"},  # created
    ))
    assert out["emails"] == [{"value": "w@x", "primary": True, "type": "work"},
                             {"value": "al@home.org", "type": "home"},
                             {"type": "other", "value": "o@x"}]
    with pytest.raises(ScimError) as exc:
        apply_patch(GROUP, patch({"op": "replace", "path": 'members[value eq "nope"]',
                                  "value": {"value": "1"}}))
    assert scim_error(exc) == (400, "noTarget")


def test_remove_variants() -> None:
    by_filter = apply_patch(GROUP, patch({"op": "remove", "path": 'members[value eq "42"]'}))
    assert members(by_filter) == ["7610385418203920"]
    by_values = apply_patch(GROUP, patch({"op": "remove", "path": "members",
                                          "value": [{"value": "7610385418203920"}]}))
    assert members(by_values) == ["42"]
    everyone = apply_patch(GROUP, patch({"op": "remove", "path": "members"}))
    assert everyone["members"] == []
    nothing = apply_patch(GROUP, patch({"op": "remove", "path": 'members[value eq "x"]'}))
    assert nothing == GROUP
    out = apply_patch(ALICE, patch({"op": "remove", "path": "displayName"},
                                   {"op": "remove", "path": "name.givenName"},
                                   {"op": "remove", "path": 'emails[type eq "work"].primary'}))
    assert "displayName" not in out and out["name"] == {"familyName": "Smith"}
    assert out["emails"][0] == {"value": "alice@example.com", "type": "work"}
    assert GROUP["members"][1]["value"] == "42" and ALICE["displayName"] == "Alice Smith"


@pytest.mark.parametrize("body, scim_type", [
    ({"Operations": [{"op": "remove"}]}, "noTarget"),
    ({"Operations": [{"op": "move", "path": "displayName", "value": "x"}]}, "invalidSyntax"),
    ({"Operations": [{"op": 5}]}, "invalidSyntax"),
    ({"Operations": []}, "invalidSyntax"),
    ({"Operations": {"op": "add"}}, "invalidSyntax"),
    ({"Operations": ["add"]}, "invalidSyntax"),
    ({}, "invalidSyntax"),
    ({"schemas": ["urn:wrong"], "Operations": [{"op": "remove", "path": "roles"}]},
     "invalidSyntax"),
    ({"Operations": [{"op": "add", "path": "nickName", "value": "x"}]}, "invalidPath"),
    ({"Operations": [{"op": "add", "path": 5, "value": "x"}]}, "invalidPath"),
    ({"Operations": [{"op": "add", "path": "members[value eq", "value": []}]}, "invalidPath"),
    ({"Operations": [{"op": "add", "path": "displayName[value eq \"1\"]", "value": "x"}]},
     "invalidPath"),
    ({"Operations": [{"op": "add", "path": "emails.value", "value": "x"}]}, "invalidPath"),
    ({"Operations": [{"op": "add", "path": "name.nick", "value": "x"}]}, "invalidPath"),
    ({"Operations": [{"op": "add", "value": {"bogus": 1}}]}, "invalidPath"),
    ({"Operations": [{"op": "add", "path": "members"}]}, "invalidValue"),
    ({"Operations": [{"op": "add", "value": "not an object"}]}, "invalidValue"),
    ({"Operations": [{"op": "replace", "path": "active", "value": "yes"}]}, "invalidValue"),
    ({"Operations": [{"op": "add", "path": "members", "value": "42"}]}, "invalidValue"),
    ({"Operations": [{"op": "add", "path": "members", "value": [{"value": 42}]}]},
     "invalidValue"),
    ({"Operations": [{"op": "add", "path": "members", "value": [{"display": "x"}]}]},
     "invalidValue"),
    ({"Operations": [{"op": "replace", "path": "displayName", "value": "x" * 256}]},
     "invalidValue"),
    ({"Operations": [{"op": "replace", "path": "id", "value": "999"}]}, "mutability"),
    ({"Operations": [{"op": "remove", "path": "meta"}]}, "mutability"),
    ({"Operations": [{"op": "replace", "value": {"schemas": ["x"]}}]}, "mutability"),
])
def test_patch_errors_leave_input_untouched(body: dict[str, Any], scim_type: str) -> None:
    before = copy.deepcopy(GROUP)
    ops = body.get("Operations")
    if isinstance(ops, list) and ops:  # a valid op goes first: it must not stick either
        body = {**body, "Operations": [
            {"op": "add", "path": "members", "value": [{"value": "77"}]}, *ops]}
    with pytest.raises(ScimError) as exc:
        apply_patch(GROUP, body)
    assert scim_error(exc) == (400, scim_type)
    assert GROUP == before


def test_unknown_op_detail_names_it() -> None:
    with pytest.raises(ScimError, match="'move'"):
        apply_patch(GROUP, patch({"op": "move", "path": "members"}))


def test_mutability_user_name_and_equal_values_allowed() -> None:
    with pytest.raises(ScimError) as exc:
        apply_patch(ALICE, patch({"op": "replace", "path": "userName", "value": "x@y"}))
    assert scim_error(exc) == (400, "mutability")
    same = apply_patch(ALICE, patch({"op": "replace",
                                     "value": {"id": ALICE["id"], "active": False}}))
    assert same["active"] is False and same["id"] == ALICE["id"]
    # the caller chooses what is immutable, and which attributes a kind has
    free = apply_patch(ALICE, patch({"op": "replace", "path": "userName", "value": "x@y"}),
                       immutable=frozenset({"id"}))
    assert free["userName"] == "x@y"
    with pytest.raises(ScimError) as exc:
        apply_patch(ALICE, patch({"op": "add", "path": "emails", "value": {"value": "x@y"}}),
                    attributes=GROUP_ATTRIBUTES)
    assert scim_error(exc) == (400, "invalidPath")


def test_patch_deeply_nested_value_is_a_scim_error() -> None:
    deep: Any = "x"
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(ScimError) as exc:
        apply_patch(GROUP, patch({"op": "replace", "path": "meta", "value": {"a": deep}}),
                    immutable=frozenset())
    assert scim_error(exc) == (400, "invalidValue")


# ---- create / PUT bodies ---------------------------------------------------------------

def test_check_user() -> None:
    body = {"userName": "a", "DisplayName": "A", "active": True, "id": "x", "meta": {},
            "schemas": ["whatever"], "unknown": 1, "emails": {"value": "a@b", "primary": True},
            "groups": [{"value": "1", "display": "g", "extra": 5}, {"value": "1"}],
            "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User": {"x": 1},
            "externalId": None, "name": {"givenName": "A", "middle": "m"}}
    assert check_resource("Users", body, for_create=True) == {
        "schemas": USER_SCHEMAS, "userName": "a", "displayName": "A", "active": True,
        "emails": [{"value": "a@b", "primary": True}], "groups": [{"value": "1", "display": "g"}],
        "name": {"givenName": "A"}}
    assert check_resource("Users", {"active": False}, for_create=False) == {
        "schemas": USER_SCHEMAS, "active": False}


def test_check_service_principal_and_group() -> None:
    sp = check_resource("ServicePrincipals", {
        "displayName": "", "applicationId": "0F8FAD5B-D9CB-469F-A165-70867728950E",
        "members": [{"value": "1"}]}, for_create=True)
    assert sp == {"schemas": SP_SCHEMAS, "displayName": "",
                  "applicationId": "0f8fad5b-d9cb-469f-a165-70867728950e"}
    group = check_resource("Groups", {"displayName": "g", "members": [{"value": "1"}],
                                      "userName": "dropped"}, for_create=True)
    assert group == {"schemas": GROUP_SCHEMAS, "displayName": "g", "members": [{"value": "1"}]}


@pytest.mark.parametrize("kind, body, scim_type, field", [
    ("Users", {}, "invalidValue", "userName"),
    ("Users", {"userName": ""}, "invalidValue", "userName"),
    ("Users", {"userName": "  "}, "invalidValue", "userName"),
    ("Users", {"userName": 5}, "invalidValue", "userName"),
    ("Users", {"userName": "a" * 256}, "invalidValue", "userName"),
    ("Users", {"userName": "a", "active": "maybe"}, "invalidValue", "active"),
    ("Users", {"userName": "a", "emails": ["a@b"]}, "invalidValue", "emails"),
    ("Users", {"userName": "a", "roles": [{"value": None}]}, "invalidValue", "roles"),
    ("Users", {"userName": "a", "name": "A"}, "invalidValue", "name"),
    ("Users", [], "invalidSyntax", "object"),
    ("ServicePrincipals", {}, "invalidValue", "displayName"),
    ("ServicePrincipals", {"displayName": "s", "applicationId": "nope"}, "invalidValue",
     "applicationId"),
    ("Groups", {"displayName": " "}, "invalidValue", "displayName"),
    ("Groups", {"displayName": "g" * 256}, "invalidValue", "displayName"),
    ("Groups", {"displayName": "g", "members": {"display": "x"}}, "invalidValue", "members"),
    ("Groups", {"displayName": "g", "entitlements": 3}, "invalidValue", "entitlements"),
])
def test_check_resource_refuses(kind: str, body: Any, scim_type: str, field: str) -> None:
    with pytest.raises(ScimError) as exc:
        check_resource(kind, body, for_create=True)
    assert scim_error(exc) == (400, scim_type)
    assert field in exc.value.message


def test_check_resource_put_does_not_require() -> None:
    assert check_resource("Groups", {}, for_create=False) == {"schemas": GROUP_SCHEMAS}
    with pytest.raises(ValueError):
        check_resource("Widgets", {}, for_create=True)
