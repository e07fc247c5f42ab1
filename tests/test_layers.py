"""The house's layering, checked: pure deciders import no I/O, and no module hides an
import of another imsrelay module inside a function (the CLI's lazy loading of the
chosen sub-command's module, by importlib in cli.py, is the one deliberate exception)."""

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "imsrelay"

# modules that open sockets, files or databases (stdlib, libraries, and imsrelay's own edges)
IO_MODULES = {
    "sqlite3", "ssl", "asyncio", "tomllib", "fcntl", "mmap", "threading",
    "aiosmtpd", "aiosmtplib", "aiohttp", "dns", "uvloop", "structlog", "urllib.request", "http.client",
    "imsrelay.config.loader", "imsrelay.queue.spool", "imsrelay.durable.journal", "imsrelay.directory.store", "imsrelay.routing.dns",
    "imsrelay.transport.maildir", "imsrelay.transport.smtp", "imsrelay.transport.pipelining", "imsrelay.ingress.adapter", "imsrelay.ingress.handler", "imsrelay.ingress.listeners", "imsrelay.site",
    "imsrelay.admin.server",
    "imsrelay.admin.client", "imsrelay.directory.replication", "imsrelay.routing.host_addresses", "imsrelay.observe.logs",
    "imsrelay.queue.manager", "imsrelay.lab.embedded", "imsrelay.cli",
}


def imported_by(statement: str) -> set[str]:
    code = ("import sys; before = set(sys.modules); " + statement +
            "; import json; print(json.dumps(sorted(set(sys.modules) - before)))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    return set(json.loads(r.stdout))


def test_pure_deciders_import_no_io():
    new = imported_by("import imsrelay.routing.router, imsrelay.policy.inbound, imsrelay.policy.rewrite, imsrelay.policy.backpressure, "
                       "imsrelay.policy.internet_mail, imsrelay.policy.journaling")
    assert "imsrelay.routing.router" in new  # the probe works
    assert not {m for m in new if m in IO_MODULES or m.split(".")[0] in IO_MODULES - {"imsrelay"}}, \
        sorted(new & IO_MODULES)
    # not even the socket module (the stdlib's email.utils would bring it in)
    assert "socket" not in new


def test_value_modules_import_no_io():
    new = imported_by("import imsrelay.model.envelope, imsrelay.model.message, imsrelay.model.objects, imsrelay.model.errors, imsrelay.model.settings, "
                      "imsrelay.queue.rules, imsrelay.policy.mail_loops, imsrelay.model.outcome, imsrelay.transport.smtp_body, "
                      "imsrelay.ingress.data_reader")
    bad = {m for m in new if m in IO_MODULES}
    assert not bad, sorted(bad)


def test_the_probe_sees_io_modules():
    assert "sqlite3" in imported_by("import imsrelay.directory.store")


def function_local_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for sub in ast.walk(node):
                names = []
                if isinstance(sub, ast.ImportFrom):
                    names = [sub.module or ""] if sub.level == 0 else ["(relative)"]
                elif isinstance(sub, ast.Import):
                    names = [a.name for a in sub.names]
                if any(n == "imsrelay" or n.startswith("imsrelay.") or n == "(relative)" for n in names):
                    found.append(f"{path}:{sub.lineno} in {node.name}()")
    return found


def test_no_function_local_imports_of_imsrelay_modules():
    found = [hit for p in sorted(PACKAGE.rglob("*.py")) for hit in function_local_imports(p)]
    assert found == []


def test_the_ast_check_finds_a_local_import(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from imsrelay.cli import main\n    return main\n")
    assert function_local_imports(sample) == [f"{sample}:2 in f()"]


def test_cli_loads_only_the_chosen_sub_command():
    new = imported_by("import sys; sys.argv = ['imsrelay', 'check-config', '--help']; "
                      "import imsrelay.cli as c; p = c.build_parser(sys.argv[1:])")
    assert "imsrelay.commands.check_config" in new
    assert "imsrelay.site" not in new and "aiohttp" not in new
