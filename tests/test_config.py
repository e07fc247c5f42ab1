"""Configuration: the seed files load; every mistake names the file and the key."""

import subprocess
import sys
from pathlib import Path

import pytest

from imsrelay.config.loader import load_config
from imsrelay.model.errors import ConfigError, ConfigErrors
from imsrelay.model.settings import parse_duration

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name,ip,user", [("A", "10", "User1"), ("B", "15", "User2"), ("C", "20", "User3")])
def test_seed_site_files_load(name, ip, user):
    c = load_config(ROOT / "config" / f"site{name}.toml")
    assert c.organisation == "ExchangeORG"
    assert c.site == f"Site{name}"
    assert c.site_domain == f"Site{name}.microsoft.com"
    assert c.company_domain == "microsoft.com"
    assert c.smtp.listen == f"127.10.10.{ip}" and c.smtp.port == 2525
    assert {m.alias for m in c.mailboxes} == {user, "Administrator"}
    assert c.hostname == f"Server{name}.Site{name}.microsoft.com"
    assert len(c.connected_sites) == 2 and len(c.email_domains) == 2
    assert c.delivery.retry_intervals == (900.0, 1800.0, 3600.0, 14400.0)


def write(tmp_path, text):
    p = tmp_path / "site.toml"
    p.write_text(text)
    return p


MINIMAL = '[site]\norganisation = "O"\nname = "SiteA"\nserver = "S"\nemail_domain = "a.example"\n'


def test_minimal_file_gets_defaults(tmp_path):
    c = load_config(write(tmp_path, MINIMAL))
    assert c.company_domain == "a.example"
    assert c.data_dir == tmp_path / "data" / "SiteA"
    assert c.smtp.max_hops == 15 and c.delivery.lifetime == 2 * 86400


@pytest.mark.parametrize("extra,key", [
    ('[smtp]\nport = "x"\n', "smtp.port"),
    ('[smtp]\nport = 70000\n', "smtp.port"),
    ('[smtp]\nrelay_networks = ["300.1.1.1/8"]\n', "smtp.relay_networks[0]"),
    ('[smtp]\nmax_hops = 0\n', "smtp.max_hops"),
    ('[smtp]\nlisten_port = 1\n', "smtp.listen_port"),
    ('[delivery]\nlifetime = "forever"\n', "delivery.lifetime"),
    ('[delivery]\nretry_intervals = ["1x"]\n', "delivery.retry_intervals[0]"),
    ('[[mailboxes]]\ndisplay_name = "x"\n', "mailboxes[0].alias"),
    ('[[mailboxes]]\nalias = "a b"\n', "mailboxes[0].alias"),
    ('[[connected_sites]]\nname = "B"\nrouting_address = "B.example"\n', "connected_sites[0].routing_address"),
    ('[[email_domains]]\ndomain = "b..example"\nhost = "h"\n', "email_domains[0].domain"),
    ('[logging]\nlevel = "loud"\n', "logging.level"),
    ('[bogus]\nx = 1\n', "bogus"),
])
def test_errors_name_file_and_key(tmp_path, extra, key):
    path = write(tmp_path, MINIMAL + extra)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.key == key
    assert str(path) in str(err.value)


def test_missing_required_key(tmp_path):
    path = write(tmp_path, '[site]\norganisation = "O"\nname = "S"\nserver = "S"\n')
    with pytest.raises(ConfigError, match="site.email_domain: is required"):
        load_config(path)


def test_toml_syntax_error(tmp_path):
    with pytest.raises(ConfigError, match=r"\(syntax\)"):
        load_config(write(tmp_path, "[site\n"))


def test_durations():
    assert parse_duration("15m") == 900
    assert parse_duration("2d") == 172800
    assert parse_duration(0.5) == 0.5
    assert parse_duration("250ms") == 0.25
    with pytest.raises(ValueError):
        parse_duration("soon")


def test_check_config_cli_one_line_error_no_traceback(tmp_path):
    path = write(tmp_path, MINIMAL + '[smtp]\nport = "x"\n')
    r = subprocess.run([sys.executable, "-m", "imsrelay", "check-config", str(path)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0
    assert f"{path}: smtp.port:" in r.stderr


def test_check_config_cli_ok():
    r = subprocess.run([sys.executable, "-m", "imsrelay", "check-config", str(ROOT / "config" / "siteB.toml")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "site SiteB" in r.stdout


@pytest.mark.parametrize("extra,key", [
    ('[smtp]\nlisten = "localhost"\n', "smtp.listen"),
    ('[smtp]\nlisten = "mail.example.net"\n', "smtp.listen"),
    ('[admin]\nlisten = "localhost"\n', "admin.listen"),
    ('[dns]\nnameservers = ["ns1.example.net"]\n', "dns.nameservers[0]"),
    ('[dns]\nnameservers = ["127.0.0.1:99999"]\n', "dns.nameservers[0]"),
    ('[dns]\nnameservers = [53]\n', "dns.nameservers[0]"),
    ('[dns]\ntimeout = "off"\n', "dns.timeout"),
    ('[smtp]\nidle_timeout = "never"\n', "smtp.idle_timeout"),
    ('[smtp]\nhostname = "bad host"\n', "smtp.hostname"),
    ('[smtp]\naccepted_domains = ["x..y"]\n', "smtp.accepted_domains[0]"),
    ('[delivery]\nsmart_host = "relay.example:0"\n', "delivery.smart_host"),
    ('[delivery]\nstarttls = "always"\n', "delivery.starttls"),
    ('[[email_domains]]\ndomain = "b.example"\nhost = "bad host"\n', "email_domains[0].host"),
    ('[replication]\nkeep_old_address = "yes"\n', "replication.keep_old_address"),
    ('[logging]\nformat = "xml"\n', "logging.format"),
])
def test_every_key_is_validated_at_load(tmp_path, extra, key):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, MINIMAL + extra))
    assert err.value.key == key


def test_all_errors_of_a_file_are_reported_at_once(tmp_path):
    path = write(tmp_path, MINIMAL + '[smtp]\nport = "x"\nlisten = "localhost"\n'
                 '[dns]\nnameservers = ["127.0.0.1", "resolver.example"]\n[logging]\nlevel = "loud"\n')
    with pytest.raises(ConfigErrors) as err:
        load_config(path)
    keys = [e.key for e in err.value.errors]
    assert keys == ["smtp.listen", "smtp.port", "dns.nameservers[1]", "logging.level"]
    assert all(line.startswith(f"{path}: ") for line in err.value.lines())
    r = subprocess.run([sys.executable, "-m", "imsrelay", "check-config", str(path)], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert [line.split(": ")[3] for line in lines] == keys
    assert all(line.startswith("imsrelay: configuration error: ") for line in lines)


def test_wildcard_and_ipv6_listen_addresses_load(tmp_path):
    for listen in ("0.0.0.0", "::", "::1", "127.10.10.10"):
        c = load_config(write(tmp_path, MINIMAL + f'[smtp]\nlisten = "{listen}"\n'))
        assert c.smtp.listen == listen


def test_defaults_come_from_the_settings_dataclasses(tmp_path):
    from imsrelay.model.settings import DeliveryConfig, DnsConfig, ReplicationConfig, SmtpConfig

    c = load_config(write(tmp_path, MINIMAL))
    assert (c.smtp, c.delivery, c.dns, c.replication) == (SmtpConfig(), DeliveryConfig(), DnsConfig(),
                                                          ReplicationConfig())


def test_one_host_port_parser():
    from imsrelay.model.addresses import parse_host_port

    assert parse_host_port("relay.example", 25) == ("relay.example", 25)
    assert parse_host_port("relay.example:2525", 25) == ("relay.example", 2525)
    assert parse_host_port("[::1]:53", 53, ip_only=True) == ("::1", 53)
    assert parse_host_port("::1", 53, ip_only=True) == ("::1", 53)
    for bad in ("relay.example:", "relay.example:x", "[::1", "", "bad host:25"):
        with pytest.raises(ValueError):
            parse_host_port(bad, 25)
    with pytest.raises(ValueError, match="not an IP address"):
        parse_host_port("ns.example", 53, ip_only=True)


SERVERS = ('[[servers]]\nname = "S"\nhost = "127.10.10.10:2525"\nadmin = "http://127.10.10.10:8025/"\n'
           '[[servers]]\nname = "Server2"\nhost = "127.10.10.11"\nport = 2526\n')


def test_servers_of_a_site_and_home_servers(tmp_path):
    c = load_config(write(tmp_path, MINIMAL + SERVERS + '[[mailboxes]]\nalias = "U"\nhome_server = "Server2"\n'))
    assert [(s.name, s.host, s.port, s.admin) for s in c.servers] == [
        ("S", "127.10.10.10", 2525, "http://127.10.10.10:8025"), ("Server2", "127.10.10.11", 2526, None)]
    assert c.mailboxes[0].home_server == "Server2"
    assert load_config(write(tmp_path, MINIMAL)).servers == ()


@pytest.mark.parametrize("extra,key", [
    ('[[servers]]\nname = "Other"\nhost = "127.0.0.2"\n', "servers"),  # this server is not listed
    (SERVERS + '[[servers]]\nname = "s"\nhost = "127.0.0.3"\n', "servers[2].name"),
    (SERVERS.replace('"127.10.10.11"', '"not a host!"'), "servers[1].host"),
    (SERVERS.replace("http://127.10.10.10:8025/", "ftp://x"), "servers[0].admin"),
    (SERVERS + '[[mailboxes]]\nalias = "U"\nhome_server = "Nowhere"\n', "mailboxes.home_server"),
])
def test_servers_errors(tmp_path, extra, key):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, MINIMAL + extra))
    assert err.value.key == key


@pytest.mark.parametrize("servers,key", [
    (SERVERS.replace("http://127.10.10.10:8025/", "http://server1.lab:8025"), "servers[0].admin"),  # a name: no
    (SERVERS.replace("http://127.10.10.10:8025/", "http://10.1.2.3:8025"), "servers[0].admin"),  # outside
    (SERVERS.replace('"127.10.10.11"', '"10.9.9.9"'), "servers[1].host"),
])
def test_a_sealed_labs_servers_stay_inside_it(tmp_path, servers, key):
    """Admin endpoints are reached over HTTP, never through the lab's DNS: a sealed lab's
    servers name lab addresses (no system resolver, no connection out)."""
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, MINIMAL + '[lab]\nsealed = true\n' + servers))
    assert err.value.key == key
    assert load_config(write(tmp_path, MINIMAL + '[lab]\nsealed = true\n' + SERVERS)).servers
