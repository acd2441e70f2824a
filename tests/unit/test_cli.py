"""`postroom -A`: finding the app and its pools, refusing a module that is no deployment, flags."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from postroom import Query, on_reply
from postroom.settings import Settings
from tests.support import DATABASE
from workers.cli import main, parser
from workers.deployment import (
    APP_VARIABLE,
    DEFAULT_APP,
    Pool,
    app_module,
    derived_pools,
    load,
    overridden,
)
from workers.launcher import api_argv, flower_env, metrics_argv, worker_argv

INSTALLED = """
from celery import Celery
import postroom
app = Celery("{name}", set_as_current=False)
postroom.install(app, postroom.Settings.from_env({{}}))
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory to write modules into, the current one, as for celery -A."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(APP_VARIABLE, DEFAULT_APP)  # so that it is restored: main() reads it
    monkeypatch.delenv(APP_VARIABLE)
    return tmp_path


def _unique() -> str:
    return f"m{uuid.uuid4().hex[:8]}"


def test_the_app_module_is_the_flag_else_the_variable_else_config(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(APP_VARIABLE, raising=False)
    assert app_module(None) == DEFAULT_APP == "config"
    monkeypatch.setenv(APP_VARIABLE, "fleetapp")
    assert app_module(None) == "fleetapp"
    assert app_module("other:app") == "other:app"


def test_servers_take_host_or_address_and_port() -> None:
    args = parser().parse_args(["-A", "fleetapp", "api", "--host", "0.0.0.0", "--port", "9000"])
    assert (args.app, args.command, args.host, args.port) == ("fleetapp", "api", "0.0.0.0", 9000)
    args = parser().parse_args(["metrics", "--address", "::1"])
    assert (args.app, args.host, args.port) == (None, "::1", None)
    args = parser().parse_args(["flower", "--port", "5600"])
    assert (args.host, args.port) == (None, 5600)


def test_a_flag_overrides_its_variable_and_an_absent_one_does_not() -> None:
    settings = Settings.from_env({"POSTROOM_API_HOST": "10.0.0.1", "POSTROOM_API_PORT": "8100"})
    changed = overridden(settings, api_host=None, api_port=9000)
    assert (changed.api_host, changed.api_port) == ("10.0.0.1", 9000)


def test_every_child_process_is_given_the_same_app_module() -> None:
    settings = Settings.from_env({"POSTROOM_METRICS_PORT": "9900"})
    pool = Pool("reports", ("events.reports",))
    assert worker_argv(pool, settings, "fleetapp")[3:6] == ["-A", "fleetapp", "worker"]
    assert api_argv(settings, "fleetapp")[3:] == [
        "-A", "fleetapp", "--host", "127.0.0.1", "--port", "8000",
    ]  # fmt: skip
    assert metrics_argv(settings, "fleetapp")[-4:] == ["--host", "127.0.0.1", "--port", "9900"]
    assert flower_env(settings, "fleetapp")[APP_VARIABLE] == "fleetapp"


def test_pools_are_derived_one_per_service_and_subscriber_pool() -> None:
    pools = {
        p.name: p
        for p in derived_pools(
            services=["orders", "ledger", "reports"],
            subscribers=["reports", "mailer"],
            partitioned=["ledger"],
        )
    }
    assert pools["orders"] == Pool("orders", ("commands.orders",), concurrency=2)
    assert pools["ledger"] == Pool("ledger", ("commands.ledger",), concurrency=1)  # in order
    assert pools["reports"].queues == ("events.reports", "commands.reports")  # one pool, both
    assert pools["mailer"].queues == ("events.mailer", "commands.mailer")
    assert len(pools) == 4


def test_a_pool_that_only_receives_replies_is_derived_as_a_service_pool() -> None:
    pool = f"replies_{_unique()}"

    class Weigh(Query, service=f"scales_{_unique()}"):
        grams: int

    on_reply(Weigh, pool=pool)(lambda reply, ctx: None)
    derived = {p.name: p for p in derived_pools()}
    assert derived[pool] == Pool(pool, (f"commands.{pool}",), concurrency=2)


def test_pools_a_package_declares_are_used(project: Path) -> None:
    name = _unique()
    (project / name).mkdir()
    (project / name / "__init__.py").write_text("")
    (project / name / "celery.py").write_text(INSTALLED.format(name=name))
    (project / name / "pools.py").write_text(
        "from workers.deployment import Pool\nPOOLS = (Pool('only', ('commands.only',)),)\n"
    )
    deployment = load(name)
    assert [p.name for p in deployment.pools] == ["only"]
    assert deployment.settings.namespace == "postroom"
    assert load(f"{name}.celery:app").pools == deployment.pools


def test_a_module_without_a_celery_app_is_refused_with_exit_2(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = _unique()
    (project / f"{name}.py").write_text("X = 1\n")
    with pytest.raises(SystemExit) as exited:
        main(["-A", name, "pools"])
    assert exited.value.code == 2
    assert f"{name} has no Celery app" in capsys.readouterr().err


def test_an_app_without_postroom_is_refused_with_not_installed(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = _unique()
    (project / f"{name}.py").write_text(
        "from celery import Celery\napp = Celery('bare', set_as_current=False)\n"
    )
    with pytest.raises(SystemExit) as exited:
        main(["-A", name, "pools"])
    assert exited.value.code == 2
    assert "postroom is not installed on the Celery app 'bare'" in capsys.readouterr().err


def test_a_module_that_cannot_be_imported_is_refused_saying_where_to_run(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["-A", "no_such_module_here", "pools"])
    assert exited.value.code == 2
    assert "run postroom from the directory holding your package" in capsys.readouterr().err


def test_migrate_brings_every_sql_store_of_the_app_to_its_newest_schema(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name, schema = _unique(), f"m{uuid.uuid4().hex[:10]}"
    (project / f"{name}.py").write_text(
        "from celery import Celery\nimport postroom\nfrom postroom.stores.sql import SqlStore\n"
        f"store = SqlStore.from_url({DATABASE!r}, {schema!r})\n"
        f"app = Celery({name!r}, set_as_current=False)\n"
        "postroom.install(app, postroom.Settings.from_env({}), stores={'a': store, 'b': store})\n"
    )
    try:
        assert main(["-A", name, "migrate"]) == 0
        assert main(["-A", name, "migrate"]) == 0  # nothing left to do: no error
        assert capsys.readouterr().out.count("migrated SqlStore") == 2  # once per store
        assert load(name).app.conf.postroom.stores["a"].pending() == 0  # the tables are there
    finally:
        store = load(name).app.conf.postroom.stores["a"]
        store.drop_schema()
        store.engine.dispose()
