"""Alembic's environment for postroom's tables and a service's own (see postroom.stores.sql).

Run through ``SqlStore.migrate()`` (or ``postroom migrate``), which hands over a connection whose
tables without a schema land in the store's schema, and that schema's name for the version table.
"""

from alembic import context

from postroom.stores.sql import VERSION_TABLE

config = context.config
connection = config.attributes["connection"]

context.configure(
    connection=connection,
    target_metadata=None,
    version_table=VERSION_TABLE,
    version_table_schema=config.attributes.get("schema"),
)
with context.begin_transaction():
    context.run_migrations()
