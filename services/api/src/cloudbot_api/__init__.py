"""The CloudBot API: accounts, provider keys, instances, and the machines' own endpoints.

Every domain is a folder (`auth/`, `api_keys/`, `instances/`, `instance_agent/`, ...) of the
same four modules, each calling only the one below it:

- `router.py`: HTTP only. Parses and authenticates the request, applies rate limits, calls
  its service and shapes the answer. It never touches a repository, a session or a commit.
  Each route is written out with its decorator, where grep finds it.
- `service.py`: the domain's rules, in one class made per request by the router's
  `get_service` dependency. Every service has the same constructor:
  `XService(uow, *, <each per-process collaborator it uses, by name>)`, e.g.
  `ApiKeyService(uow, vault=resources.vault)`; never the whole `Resources` bag. It makes its
  repositories from the unit of work (`XRepository(uow.session)`) and never reaches into
  the session itself. Work that may only happen once the transaction committed (publishing
  a command or an event) is handed to `uow.after_commit`. Errors are `ProblemError`s.
- `repository.py`: all SQL of the domain, in a subclass of `repository.Repository`. It
  flushes and never commits.
- Read-only routes (GET, on every request's path) skip the unit of work: the router's
  `get_queries` makes the domain's `XQueries(resources.read_connections, *, ...)` (in
  `service.py`), whose reads are Core statements in an `XReads` subclass of
  `repository.ReadRepository` (in `repository.py`) on the read engine, answered as plain
  rows. An ORM session costs several times the query it runs.
- `schemas.py`: the Pydantic models of requests and answers.

The unit of work (`unit_of_work.UnitOfWork`, the `UowDep` request dependency) owns the
transaction: it commits before the response is sent, or rolls back when the request fails,
and then runs the after-commit actions. A service whose change must stick although it
answers with an error (a reused refresh token ends its login session, then answers 401)
says so with `uow.keep_on_error()`.
"""
