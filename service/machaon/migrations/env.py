"""Alembic environment: machaon passes its own engine or connection (store.upgrade)."""

from alembic import context
from sqlalchemy.engine import Connection

from machaon.store import Base


def run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=Base.metadata,
                      render_as_batch=connection.dialect.name == "sqlite")
    context.run_migrations()


bind = context.config.attributes["bind"]
if isinstance(bind, Connection):
    with bind.begin():
        run(bind)
else:
    with bind.begin() as connection:
        run(connection)
