"""PostgreSQL database (asyncpg connection pool).

Rows come back as plain dicts. Query parameters of the DSN that asyncpg does not
know (``?search_path=myschema``) are sent as server settings, which is how tests
give every test a schema of its own.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg

from core_base.errors import (
    NoAnswerInTimeError,
    ServerProcess,
    SettingsError,
    UnavailableError,
)
from core_base.ports.database import Database, Row

logger = logging.getLogger(__name__)

# Fail fast when Postgres is down instead of hanging a request; callers retry.
_CONNECT_TIMEOUT_S = 10.0
_PING_TIMEOUT_S = 5.0
# A graceful close of the pool: milliseconds when the server answers.
_CLOSE_TIMEOUT_S = 2.0
# A statement (or a wait for a pooled connection) that gets no answer in this time
# raises UnavailableError (a 503 to the caller, who retries) instead of holding its
# request, and every request queued behind it, for as long as TCP takes to give up
# on a silent peer (a hung server, a partition that drops packets): hours. Our
# statements take milliseconds on a healthy server; ``migrate`` waits without one.
DEFAULT_COMMAND_TIMEOUT_S = 10.0
# What a lost or refused connection raises (a restart, a failover, a network cut).
# ``InternalClientError``: a connection the server terminated while the pool handed
# it out can fail the next query with a protocol-state error instead of a
# connection error (seen under ``pg_terminate_backend``); the pool replaces it.
_CONNECTION_ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.InternalClientError,
)
# What the server answers a login it refuses (an unknown role, a wrong password:
# ``InvalidPasswordError`` is a subclass) or a database it does not have. Retrying
# never helps: at start-up they are the deployment's settings, not an outage.
_LOGIN_ERRORS = (asyncpg.InvalidAuthorizationSpecificationError,)
_DATABASE_ERRORS = (asyncpg.InvalidCatalogNameError,)


@contextmanager
def _unavailable_on_connection_error(
    connection: asyncpg.Connection | None = None,
) -> Iterator[None]:
    """Raise a lost connection as ``UnavailableError``. With ``connection`` (a
    statement on it), also the ``InterfaceError`` asyncpg raises for using it once
    it is closed (any other ``InterfaceError`` is a bug here, and stays one); the
    error names the server process behind it (``server_process``)."""
    # Read now: a connection lost meanwhile is back in the pool, and tells nothing.
    process: ServerProcess | None = getattr(connection, "server_process", None)
    try:
        yield
    except TimeoutError as exc:
        error: UnavailableError = NoAnswerInTimeError("PostgreSQL did not answer in time")
        cause: BaseException = exc
    except _CONNECTION_ERRORS as exc:
        error, cause = UnavailableError(f"PostgreSQL unreachable: {type(exc).__name__}"), exc
    except asyncpg.InterfaceError as exc:
        if connection is None or not _is_lost(connection):
            raise
        error, cause = UnavailableError("PostgreSQL unreachable: connection closed"), exc
    else:
        return
    error.server_process = process
    raise error from cause


def _server_address(dsn: str) -> str:
    """Where a ``postgresql://`` URL points, as written (``host:port``, ``[v6]:port``,
    or libpq's list of hosts), else its query's ``host`` (a socket directory) or
    localhost; port 5432 where none is given."""
    parts = urlsplit(dsn)
    written = parts.netloc.rpartition("@")[2]
    if "," in written or _HAS_PORT.search(written):
        return written
    query = parse_qs(parts.query)
    host = written or (query.get("host") or ["localhost"])[0]
    return f"{host}:{(query.get('port') or ['5432'])[0]}"


# A host (name, IPv4 or [IPv6]) followed by its port.
_HAS_PORT = re.compile(r"(^[^:\[\]]+|\]):\d+$")


def _ping_failure(exc: BaseException) -> UnavailableError:
    """Why a ping failed, for the readiness log (a timeout says nothing by itself)."""
    if isinstance(exc, TimeoutError):
        return UnavailableError(f"PostgreSQL: no answer within {_PING_TIMEOUT_S:g} s")
    return UnavailableError(f"PostgreSQL: {type(exc).__name__}: {exc}".rstrip(": "))


def _is_lost(connection: asyncpg.Connection) -> bool:
    try:
        return bool(connection.is_closed())
    except asyncpg.InterfaceError:
        # The pool took it back already: it does so at once with a connection
        # whose server side went away.
        return True


async def _keep_session(connection: asyncpg.Connection) -> None:
    """Pool reset on release: nothing beyond asyncpg's own (which rolls back an open
    transaction). The default also runs ``RESET ALL; UNLISTEN *; ...``, a round trip
    per query outside a transaction; no session state is ever changed here (no SET,
    LISTEN, advisory locks or cursors), and the DSN's settings (``search_path``) are
    connection defaults that a reset would keep anyway."""


def affected_rows(status: str) -> int:
    """The row count in a command status (``"INSERT 0 3"`` -> 3, ``"CREATE TABLE"`` -> 0)."""
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


class PostgresDatabase:
    """``Database`` on a PostgreSQL pool. Call :meth:`connect` before use."""

    dialect: str = "postgresql"

    def __init__(
        self,
        dsn: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        command_timeout_s: float | None = DEFAULT_COMMAND_TIMEOUT_S,
        login_setting: str = "DATABASE_URL",
        database_setting: str = "DATABASE_URL",
    ) -> None:
        """``command_timeout_s``: the longest wait for a statement's answer or for a
        pooled connection (``None``: no limit). ``login_setting`` and
        ``database_setting``: the variables that :meth:`connect` names when the
        server refuses the login or does not have the database."""
        self._dsn = dsn
        self._login_setting = login_setting
        self._database_setting = database_setting
        self._min_size = min_size
        self._max_size = max_size
        self._command_timeout_s = command_timeout_s
        self._pool: asyncpg.Pool | None = None
        self._untraced_logged = False
        # Connections of cancelled work going back to the pool (see _connection).
        self._releasing: set[asyncio.Task[None]] = set()

    @property
    def command_timeout_s(self) -> float | None:
        return self._command_timeout_s

    def __repr__(self) -> str:  # the DSN may hold a password
        return f"PostgresDatabase(min_size={self._min_size}, max_size={self._max_size})"

    async def connect(self) -> None:
        """Open the pool; idempotent. Raises ``UnavailableError`` when Postgres is down,
        ``SettingsError`` when it refuses the login or has no such database."""
        if self._pool is not None:
            return
        with (
            self._where_on_failure(),
            _unavailable_on_connection_error(),
            self._settings_error_on_refusal(),
        ):
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=self._min_size,
                max_size=self._max_size,
                timeout=_CONNECT_TIMEOUT_S,
                command_timeout=self._command_timeout_s,
                reset=_keep_session,
                init=self._identify,
                connection_class=_TracedConnection,
            )

    @contextmanager
    def _where_on_failure(self) -> Iterator[None]:
        """A server not reached at start-up, named with the address tried (a typo in
        the host shows as a bare ``gaierror`` otherwise)."""
        try:
            yield
        except UnavailableError as exc:
            address, cause = _server_address(self._dsn), exc.__cause__
            if isinstance(exc, NoAnswerInTimeError):
                message = f"PostgreSQL at {address} did not answer within {_CONNECT_TIMEOUT_S:g} s"
            else:
                why = f"{type(cause).__name__}: {cause}".rstrip(": ") if cause else str(exc)
                message = f"PostgreSQL unreachable at {address}: {why}"
            raise type(exc)(message) from cause

    async def _identify(self, connection: _TracedConnection) -> None:
        """Note the server process behind a new connection (see ``ServerProcess``)."""
        try:
            row = await connection.fetchrow(
                "SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()"
            )
        except asyncpg.PostgresError as exc:
            # pg_stat_activity refused (a hardened server), say: the connection serves.
            if not isinstance(exc, _CONNECTION_ERRORS):
                self._log_untraced(f"pg_stat_activity not readable ({type(exc).__name__})")
                return
            raise
        if row is None or row["pid"] != connection.get_server_pid():
            self._log_untraced(
                "the server process is not the one the connection reports"
                " (a connection pooler in between?)"
            )
            return
        connection.server_process = ServerProcess(row["pid"], row["backend_start"])

    def _log_untraced(self, why: str) -> None:
        if not self._untraced_logged:
            self._untraced_logged = True
            logger.warning(
                "PostgreSQL: %s: statements that go unanswered cannot be traced to their"
                " server process",
                why,
            )

    @contextmanager
    def _settings_error_on_refusal(self) -> Iterator[None]:
        """The server's refusal as one line naming the variable to fix. Its message
        names the role or the database, never the password."""
        try:
            yield
        except _LOGIN_ERRORS as exc:
            raise SettingsError(
                f"{self._login_setting}: PostgreSQL refused the login ({exc})"
            ) from None
        except _DATABASE_ERRORS as exc:
            raise SettingsError(
                f"{self._database_setting}: {exc} on the PostgreSQL server"
            ) from None

    async def close(self) -> None:
        """Close the pool: gracefully, or at once when the server does not answer
        (a stop must not wait for a hung server)."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            # The releases of cancelled work first: the pool waits for them anyway.
            await asyncio.wait_for(_gather_quietly(self._releasing), _CLOSE_TIMEOUT_S)
            await asyncio.wait_for(pool.close(), _CLOSE_TIMEOUT_S)
        except (TimeoutError, *_CONNECTION_ERRORS, asyncpg.InterfaceError) as exc:
            logger.warning("PostgreSQL connections closed at once (%s)", type(exc).__name__)
            pool.terminate()

    async def execute(self, query: str, *args: Any) -> int:
        """Run a statement; returns the number of rows it changed."""
        async with self._connection() as connection:
            return await PostgresTransaction(connection).execute(query, *args)

    async def fetch(self, query: str, *args: Any) -> list[Row]:
        async with self._connection() as connection:
            return await PostgresTransaction(connection).fetch(query, *args)

    async def fetchrow(self, query: str, *args: Any) -> Row | None:
        async with self._connection() as connection:
            return await PostgresTransaction(connection).fetchrow(query, *args)

    async def executescript(self, statements: Sequence[str]) -> None:
        """Run DDL statements in one transaction."""
        async with self.transaction() as transaction:
            await transaction.executescript(statements)

    def transaction(self) -> AbstractAsyncContextManager[Database]:
        """A transaction on one pooled connection; rolled back when the block raises."""
        return self._transaction()

    async def ping(self) -> bool:
        if self._pool is None:
            return False
        try:
            async with self._pool.acquire(timeout=_PING_TIMEOUT_S) as connection:
                await connection.fetchval("SELECT 1", timeout=_PING_TIMEOUT_S)
        except (*_CONNECTION_ERRORS, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise _ping_failure(exc) from exc
        return True

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Database]:
        async with self._connection() as connection:
            # BEGIN, COMMIT and ROLLBACK meet a lost connection as any query does.
            with _unavailable_on_connection_error(connection):
                # Entered as ``async with`` would, and left by hand: asyncpg then
                # knows the transaction is managed, so the release that rolls back a
                # cancelled one does it without logging an error about it.
                transaction = connection.transaction()
                await transaction.__aenter__()
                try:
                    yield PostgresTransaction(connection)
                except asyncio.CancelledError:
                    # No ROLLBACK to wait for here (on a hung server: for ever, the
                    # task with it): the release, in the background, rolls back.
                    raise
                except BaseException as exc:
                    await transaction.__aexit__(type(exc), exc, exc.__traceback__)
                    raise
                await transaction.__aexit__(None, None, None)

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        pool = self._pool  # kept: close() may clear it before the release
        if pool is None:
            raise RuntimeError("PostgresDatabase used before connect()")
        with _unavailable_on_connection_error():
            connection = await pool.acquire(timeout=self._command_timeout_s)
        in_background = False
        try:
            yield connection
        except asyncio.CancelledError:
            # Cancelled mid-use (a stop's bound, a caller's timeout). asyncpg asks the
            # server to stop the statement, and the release waits for that and resets
            # the connection: up to the command timeout on a hung server. So it goes
            # on in the background and the canceller is not held. (Terminating the
            # connection instead would drop that request: the statement would run
            # on, and commit.)
            in_background = True
            self._release_in_background(pool, connection)
            raise
        except UnavailableError as exc:
            named = isinstance(exc, NoAnswerInTimeError) or exc.server_process is not None
            if named and not _is_lost(connection):  # a lost one is the pool's already
                # No answer in time: the reset on release would wait as long again (the
                # caller with it). Or it is named as a process that may still run an
                # abandoned statement, to be ended (it must not serve another).
                # Closed at once; the pool opens a new connection when one is needed.
                connection.terminate()
            raise
        finally:
            if not in_background:
                await self._release(pool, connection)

    def _release_in_background(self, pool: asyncpg.Pool, connection: asyncpg.Connection) -> None:
        task = asyncio.create_task(self._release(pool, connection))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def _release(self, pool: asyncpg.Pool, connection: asyncpg.Connection) -> None:
        """Back to the pool, which resets it first: a wait for the server. Past the
        timeout the pool closes the connection instead, and raises; what was done
        on it stands (a commit that was answered is a commit), so that is no error
        of the caller's. A pool closed meanwhile raises InterfaceError."""
        try:
            await pool.release(connection, timeout=self._command_timeout_s)
        except (*_CONNECTION_ERRORS, asyncpg.InterfaceError) as exc:
            logger.warning("PostgreSQL connection closed on release: %s", type(exc).__name__)


async def _gather_quietly(tasks: set[asyncio.Task[None]]) -> None:
    await asyncio.gather(*tasks, return_exceptions=True)


class _TracedConnection(asyncpg.Connection):  # type: ignore[misc]
    """A connection that knows its server process (set when the pool opens it; None
    when it cannot be told). Kept on the connection itself: after a failover a pid
    may name processes of both servers at once."""

    __slots__ = ("server_process",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.server_process: ServerProcess | None = None


class PostgresTransaction:
    """The query methods of ``Database``, bound to one connection (inside a transaction
    when :meth:`PostgresDatabase.transaction` made it).

    ``transaction()`` here opens a savepoint; ``connect``/``close`` do nothing
    (the owning :class:`PostgresDatabase` returns the connection to its pool).
    """

    dialect: str = "postgresql"

    def __init__(self, connection: asyncpg.Connection) -> None:
        self._connection = connection

    async def connect(self) -> None:
        """Already connected."""

    async def close(self) -> None:
        """The transaction ends with its ``async with`` block."""

    async def execute(self, query: str, *args: Any) -> int:
        with _unavailable_on_connection_error(self._connection):
            return affected_rows(await self._connection.execute(query, *args))

    async def fetch(self, query: str, *args: Any) -> list[Row]:
        with _unavailable_on_connection_error(self._connection):
            records = await self._connection.fetch(query, *args)
        return [dict(record) for record in records]

    async def fetchrow(self, query: str, *args: Any) -> Row | None:
        with _unavailable_on_connection_error(self._connection):
            record = await self._connection.fetchrow(query, *args)
        return None if record is None else dict(record)

    async def executescript(self, statements: Sequence[str]) -> None:
        for statement in statements:
            await self.execute(statement)

    def transaction(self) -> AbstractAsyncContextManager[Database]:
        return self._savepoint()

    async def ping(self) -> bool:
        try:
            await self._connection.fetchval("SELECT 1", timeout=_PING_TIMEOUT_S)
        except (*_CONNECTION_ERRORS, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise _ping_failure(exc) from exc
        return True

    @asynccontextmanager
    async def _savepoint(self) -> AsyncIterator[Database]:
        with _unavailable_on_connection_error(self._connection):
            async with self._connection.transaction():
                yield self
