"""A ``--config`` command acts only on the site its file names: the endpoint it reaches
must serve that site and that data directory (another lab at the same admin address
is refused with one line, and nothing is changed there)."""

from __future__ import annotations

import asyncio
import copy

from ims_kit import admin, admin_section
from sitekit import running_site, site_mapping, write_site_file

from imsrelay.cli import main


async def cli(*argv: str) -> int:
    return await asyncio.to_thread(main, list(argv))


async def test_a_command_refuses_an_endpoint_serving_another_data_directory(tmp_path, capsys):
    mapping = site_mapping("SiteA", **admin_section())
    running_dir = tmp_path / "walk-data"
    running_dir.mkdir()
    _, running = write_site_file(running_dir, copy.deepcopy(mapping))
    other_dir = tmp_path / "lab-data"
    other_dir.mkdir()
    other_file, _ = write_site_file(other_dir, copy.deepcopy(mapping))  # the same site and admin address
    async with running_site(running) as site:
        capsys.readouterr()
        assert await cli("directory", "add", "WrongLab", "--config", str(other_file)) == 3
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        assert f"serves site SiteA with data in {running.data_dir.resolve()}" in err[0]
        assert f"not this file's site SiteA with data in {(other_dir / 'SiteA').resolve()}" in err[0]
        directory = await admin(site, "GET", "/directory?site=SiteA")
        assert "WrongLab" not in {m["alias"] for m in directory["mailboxes"]}  # nothing changed there
        for argv in (("replicate", "status"), ("kcc", "check-now"), ("site-addressing", "show"),
                     ("transfer-mode", "show"), ("faults", "list")):
            assert await cli(*argv, "--config", str(other_file)) == 3, argv
            assert "not this file's site SiteA" in capsys.readouterr().err
        # the right file (its own data directory) works
        assert await cli("directory", "add", "RightLab", "--config", str(running.path)) == 0
        assert "RightLab" in capsys.readouterr().out


async def test_a_command_refuses_an_endpoint_serving_another_site(tmp_path, capsys):
    a = site_mapping("SiteA", **admin_section())
    b = site_mapping("SiteB", **admin_section())
    b["admin"] = dict(a["admin"])  # SiteB's file points at SiteA's admin address
    _, running = write_site_file(tmp_path, a)
    b_dir = tmp_path / "b"
    b_dir.mkdir()
    b_file, _ = write_site_file(b_dir, b)
    async with running_site(running):
        capsys.readouterr()
        assert await cli("directory", "add", "Wrong", "--config", str(b_file)) == 3
        assert "serves site SiteA" in capsys.readouterr().err
        # --offline sees that SiteB is not running there (SiteA is): it goes to SiteB's own files
        assert await cli("directory", "add", "Offline", "--config", str(b_file), "--offline") == 2
        err = capsys.readouterr().err
        assert "has not been started yet" in err and "is running" not in err
