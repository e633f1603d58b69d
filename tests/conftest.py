"""Store fixtures: every store test runs on a real SQLite file and, when REFLOOP_TEST_POSTGRES_URL is
set (always in CI), on a throwaway PostgreSQL database created for this run and dropped after it."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from refloop.config import DatabaseSettings
from refloop.store import migrate
from refloop.store.engine import make_engine

PG_ENV = "REFLOOP_TEST_POSTGRES_URL"


def _pg_admin_url() -> str | None:
    url = os.environ.get(PG_ENV)
    if not url:
        return None
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    return url


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str | None]:
    """A migrated template database for this run; per-test databases are cheap copies of it."""
    admin_url = _pg_admin_url()
    if admin_url is None:
        yield None
        return
    run = f"refloop_t{os.getpid()}_{secrets.token_hex(3)}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{run}_tpl"'))
    tpl_url = make_url(admin_url).set(database=f"{run}_tpl").render_as_string(hide_password=False)
    eng = make_engine(DatabaseSettings(url=tpl_url))
    migrate.upgrade(eng)
    eng.dispose()
    yield run
    with admin.connect() as c:
        rows = c.execute(text("SELECT datname FROM pg_database WHERE datname LIKE :p"), {"p": f"{run}%"}).all()
        for (name,) in rows:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


_counter = iter(range(1, 1_000_000))


def new_pg_database(run: str) -> str:
    admin_url = _pg_admin_url()
    assert admin_url is not None
    name = f"{run}_{next(_counter)}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{run}_tpl"'))
    admin.dispose()
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path, pg_template: str | None) -> str:
    """A fresh, empty-or-migrated database URL on each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'refloop.db'}"
    return new_pg_database(_require_pg(pg_template))


def _require_pg(pg_template: str | None) -> str:
    if pg_template is None:
        if os.environ.get("CI"):
            pytest.fail(f"{PG_ENV} must be set in CI: the PostgreSQL tests may not be skipped there")
        pytest.skip(f"{PG_ENV} is not set")
    return pg_template


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'refloop.db'}"


@pytest.fixture
def pg_url(pg_template: str | None) -> str:
    return new_pg_database(_require_pg(pg_template))


# -- TLS material (trustme): a throwaway CA and a server certificate for 127.0.0.1 ------------------
@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def certs(ca: trustme.CA, tmp_path: Path) -> dict[str, str]:
    server = ca.issue_cert("127.0.0.1", "localhost")
    paths = {"cert": tmp_path / "server.pem", "key": tmp_path / "server.key", "ca": tmp_path / "ca.pem"}
    server.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    for pem in server.cert_chain_pems[1:]:
        pem.write_to_path(str(paths["cert"]), append=True)
    server.private_key_pem.write_to_path(str(paths["key"]))
    ca.cert_pem.write_to_path(str(paths["ca"]))
    return {k: str(v) for k, v in paths.items()}
