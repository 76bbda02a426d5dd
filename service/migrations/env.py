"""Alembic environment: machaon passes its own engine (see store.upgrade)."""

from alembic import context
from machaon.store import Base

engine = context.config.attributes["engine"]
with engine.begin() as connection:
    context.configure(connection=connection, target_metadata=Base.metadata,
                      render_as_batch=connection.dialect.name == "sqlite")
    context.run_migrations()
