"""Accounts, tokens and per-user budgets on their own: real SQLite files, a hand-driven clock."""

from __future__ import annotations

import pytest

from hub_server.accounts import Accounts, SingleToken, token_digest
from hub_server.errors import AccountError, HubFull, RateLimited
from hub_server.limits import AdmissionGate, TokenBudgets


@pytest.fixture()
def accounts(tmp_path):
    db = Accounts(tmp_path / "hub" / "accounts.sqlite3")
    yield db
    db.close()


def test_tokens_authenticate_their_user_until_revoked(accounts):
    accounts.add_user("ada")
    record, token = accounts.create_token("ada")
    assert accounts.user_for_token(token) == "ada"
    assert accounts.user_for_token(token + "x") is None
    accounts.revoke_token(record.token_id)
    assert accounts.user_for_token(token) is None
    assert accounts.user("ada").active_tokens == 0


def test_removing_a_user_removes_their_tokens(accounts):
    accounts.add_user("ada")
    _, token = accounts.create_token("ada")
    accounts.remove_user("ada")
    assert accounts.user_for_token(token) is None and accounts.tokens() == []


@pytest.mark.parametrize("name", ["", "a b", "x" * 65, "-lead", "semi;colon"])
def test_bad_user_names_are_refused(accounts, name):
    with pytest.raises(AccountError, match="not a valid user name"):
        accounts.add_user(name)


def test_clear_refusals(accounts):
    accounts.add_user("ada")
    with pytest.raises(AccountError, match="already exists"):
        accounts.add_user("ada")
    with pytest.raises(AccountError, match="hub_server users add bob"):
        accounts.create_token("bob")
    with pytest.raises(AccountError, match="tokens list"):
        accounts.revoke_token("tok_nope")


def test_database_is_wal_private_and_migrates_once(tmp_path):
    path = tmp_path / "accounts.sqlite3"
    Accounts(path).add_user("ada")
    again = Accounts(path)  # reopening runs no migration twice
    assert [u.name for u in again.users()] == ["ada"]
    assert again._query("PRAGMA journal_mode")[0][0] == "wal"
    assert path.stat().st_mode & 0o777 == 0o600


def test_single_token():
    check = SingleToken("s3cret")
    assert check.user_for_token("s3cret") == "local" and check.user_for_token("s3cre") is None
    assert token_digest("s3cret") != "s3cret"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_budget_admits_into_debt_then_waits_for_refill():
    clock = Clock()
    budgets = TokenBudgets(60, clock)  # one token per second
    budgets.charge("ada", 100)  # a long prompt passes once
    with pytest.raises(RateLimited) as refused:
        budgets.charge("ada", 1)
    assert refused.value.retry_after_s == 41
    budgets.charge("bob", 1)  # others are not held back
    clock.now = 41
    budgets.charge("ada", 1)
    assert budgets.remaining("ada") == 0


def test_unlimited_budget():
    budgets = TokenBudgets(0)
    budgets.charge("ada", 10**9)
    assert budgets.remaining("ada") is None


def test_admission_gate_refuses_past_its_limit_and_recovers():
    gate = AdmissionGate(2)
    with gate.admit(), gate.admit(), pytest.raises(HubFull, match="2 requests in flight"), gate.admit():
        pass
    with gate.admit(), gate.admit():
        pass
    unlimited = AdmissionGate(0)
    with unlimited.admit(), unlimited.admit(), unlimited.admit():
        pass
