"""Shared pytest set-up.  Test helpers live in tests/sitekit.py (real sites on
loopback, sending mail, free ports, an organisation of sites), tests/nsd_server.py
(a real nsd) and tests/smtp_sink.py (Postfix's smtp-sink); ``tests`` is on the
import path through ``pythonpath`` in pyproject.toml."""

from collections.abc import AsyncIterator, Callable
from typing import Any

# Imported up front: the hypothesis plugin's late import at the session's end trips a CPython
# 3.11 AST recursion-depth check after the TLS tests ("AST constructor recursion depth mismatch").
import hypothesis  # noqa: F401
import pytest
from sitekit import Organisation

from imsrelay.observe.logs import configure_logging

configure_logging("warning", "json")


@pytest.fixture(autouse=True, scope="session")
def no_system_resolver() -> Any:
    """No test asks the host's resolver (every domain in them is real or reserved, never
    ours to look up): a site in this process that is not sealed and names no nameservers
    gets a resolver that asks a loopback port nothing listens on, so a look-up fails at
    once as a temporary DNS failure instead of leaving the machine."""
    import dns.asyncresolver
    import dns.nameserver

    from imsrelay.routing import dns as site_dns

    def dead_loopback_resolver() -> dns.asyncresolver.Resolver:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver("127.0.0.1", 9)]
        return resolver

    real = site_dns.system_resolver
    site_dns.system_resolver = dead_loopback_resolver
    yield
    site_dns.system_resolver = real


@pytest.fixture
async def organisation(tmp_path) -> AsyncIterator[Callable[..., Organisation]]:
    """Make ``Organisation``s (KB Q196927's three sites) in this test's directory;
    every site they started is stopped at the end."""
    made: list[Organisation] = []

    def make(**kw: Any) -> Organisation:
        org = Organisation(tmp_path, **kw)
        made.append(org)
        return org

    yield make
    for org in made:
        await org.close()


# The longest files start first: with the suite's files spread over a few workers
# (--dist loadfile), a long file picked up last would keep the whole run waiting.
SLOW_FIRST = ("test_compose_console_walk.py", "test_compose_walkthrough.py", "test_compose_lab.py",
              "test_console_walk.py", "test_fuzz.py", "test_crash.py", "test_console_browser.py",
              "test_access.py", "test_docs.py", "test_walkthrough.py")


# The Docker lab files share one engine lock (tests/compose_kit.py engine_lock): spread over
# several workers, all but one would sit waiting on it while holding a worker.  They go to one
# worker as one unit, one after the other, and the other workers take the rest of the suite.
COMPOSE_SCOPE = "docker-compose-labs"


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    if config.getoption("dist", None) != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class ComposeFilesTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return COMPOSE_SCOPE if path.rsplit("/", 1)[-1].startswith("test_compose_") else path

    return ComposeFilesTogether(config, log)


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
