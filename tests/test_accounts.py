"""Accounts, tokens and per-user budgets on their own: real SQLite files, a hand-driven clock."""

from __future__ import annotations

import sqlite3
import time
from datetime import datetime, timedelta, timezone

import pytest

from hub_server.accounts import MIGRATIONS, Accounts, SingleToken, token_digest
from hub_server.errors import AccountError, AccountsDamaged, HubFull, RateLimited, TokenExpired
from hub_server.limits import AdmissionGate, TokenBudgets
from hub_server.sessions import Owner

ADA, BOB = Owner("acct_ada", "ada"), Owner("acct_bob", "bob")  # budgets are kept per account


@pytest.fixture()
def accounts(tmp_path):
    db = Accounts(tmp_path / "hub" / "accounts.sqlite3")
    yield db
    db.close()


def test_tokens_authenticate_their_user_until_revoked(accounts):
    accounts.add_user("ada")
    record, token = accounts.create_token("ada")
    assert accounts.owner_for_token(token).name == "ada"
    assert accounts.owner_for_token(token + "x") is None
    accounts.revoke_token(record.token_id)
    assert accounts.owner_for_token(token) is None
    assert accounts.user("ada").active_tokens == 0


def test_removing_a_user_removes_their_tokens(accounts):
    accounts.add_user("ada")
    _, token = accounts.create_token("ada")
    accounts.remove_user("ada")
    assert accounts.owner_for_token(token) is None and accounts.tokens() == []


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


def test_a_name_added_again_is_a_new_account(accounts):
    accounts.add_user("carol")
    _, old = accounts.create_token("carol")
    first = accounts.owner_for_token(old)
    accounts.remove_user("carol")
    accounts.add_user("carol")
    _, new = accounts.create_token("carol")
    second = accounts.owner_for_token(new)
    assert first.name == second.name == "carol" and first != second
    assert accounts.gone({first, second}) == {first}


def test_operators_are_told_apart(accounts):
    accounts.add_user("prom", role="operator")
    accounts.add_user("ada")
    assert accounts.owner_for_token(accounts.create_token("prom")[1]).operator
    assert not accounts.owner_for_token(accounts.create_token("ada")[1]).operator
    with pytest.raises(AccountError, match="not a role"):
        accounts.add_user("eve", role="root")


def test_an_expired_token_says_it_expired(accounts):
    accounts.add_user("ada")
    soon = datetime.now(timezone.utc) + timedelta(seconds=1.5)
    record, token = accounts.create_token("ada", soon)
    assert record.expires_at and accounts.owner_for_token(token).name == "ada"
    assert accounts.user("ada").active_tokens == 1
    time.sleep(2)
    with pytest.raises(TokenExpired, match="expired at"):
        accounts.owner_for_token(token)
    assert accounts.user("ada").active_tokens == 0
    with pytest.raises(AccountError, match="already past"):
        accounts.create_token("ada", datetime.now(timezone.utc) - timedelta(days=1))


def test_a_database_of_the_first_schema_migrates_with_its_tokens(tmp_path):
    path = tmp_path / "accounts.sqlite3"
    with sqlite3.connect(path) as old:  # as the hub's first release left it
        old.executescript(MIGRATIONS[0][1])
        old.execute("CREATE TABLE migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
        old.execute("INSERT INTO migrations VALUES ('001_users_and_tokens', '2026-11-30')")
        old.execute("INSERT INTO users (name, created_at) VALUES ('ada', '2026-11-30')")
        old.execute("INSERT INTO tokens VALUES ('tok_1', 1, ?, '2026-11-30', NULL)", (token_digest("seh_old"),))
    owner = Accounts(path).owner_for_token("seh_old")
    assert owner.name == "ada" and owner.account_id.startswith("acct_") and not owner.operator


def test_single_token():
    check = SingleToken("s3cret")
    assert check.owner_for_token("s3cret").name == "local" and check.owner_for_token("s3cre") is None
    assert token_digest("s3cret") != "s3cret"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_budget_admits_into_debt_then_waits_for_refill():
    clock = Clock()
    budgets = TokenBudgets(60, clock)  # one token per second
    budgets.check(ADA)
    budgets.charge(ADA, 100)  # a long prompt passes once
    with pytest.raises(RateLimited) as refused:
        budgets.check(ADA)
    assert refused.value.retry_after_s == 41
    budgets.check(BOB)  # others are not held back
    clock.now = 41
    budgets.check(ADA)
    budgets.charge(ADA, 1)
    assert budgets.remaining(ADA) == 0


def test_unlimited_budget():
    budgets = TokenBudgets(0)
    budgets.charge(ADA, 10**9)
    budgets.check(ADA)
    assert budgets.remaining(ADA) is None


def test_admission_gate_refuses_past_its_limit_and_recovers():
    gate = AdmissionGate(2)
    with gate.admit(), gate.admit(), pytest.raises(HubFull, match="2 requests in flight"), gate.admit():
        pass
    with gate.admit(), gate.admit():
        pass
    unlimited = AdmissionGate(0)
    with unlimited.admit(), unlimited.admit(), unlimited.admit():
        pass


def test_an_empty_file_where_accounts_were_is_damage_not_no_accounts(tmp_path):
    path = tmp_path / "accounts.sqlite3"
    Accounts(path).add_user("ada")
    path.write_bytes(b"")
    with pytest.raises(AccountsDamaged, match="0 bytes.*restore it from a backup, or move it aside"):
        Accounts(path)
    assert path.read_bytes() == b""
