"""Database schema migrations and the ``migrate`` command."""
