"""The router's TOML config and flags: typed, merged, and wrong fields named."""

import pytest

from serving import router_config
from serving.cli import parser
from serving.cli import router_config as from_args
from serving.errors import UsageError

TOML = '''
decode = ["http://d:1"]
prefill = ["http://l:1"]

[[prfaas]]
name = "east"
prefill = ["http://p:1", "http://p:2"]
egress_gbps = 100.0
threshold_tokens = 20236
kv_addresses = { "http://d:1" = "203.0.113.5:9200" }

[control]
interval_s = 0.25
'''


def write(tmp_path, text):
    path = tmp_path / "router.toml"
    path.write_text(text)
    return path


def test_toml_gives_pools_clusters_and_links(tmp_path):
    config = router_config.load(write(tmp_path, TOML))
    assert config.decode == ["http://d:1"] and config.prefill == ["http://l:1"]
    (east,) = config.prfaas
    assert (east.name, east.prefill, east.egress_gbps, east.threshold_tokens) == ("east", ["http://p:1", "http://p:2"],
                                                                                 100.0, 20236)
    assert east.kv_addresses == {"http://d:1": "203.0.113.5:9200"}
    assert config.control.interval_s == 0.25
    assert east.threshold_config().min_tokens == 20236
    assert config.prefill_urls == ("http://l:1", "http://p:1", "http://p:2")


@pytest.mark.parametrize("text, message", [
    (TOML.replace("egress_gbps", "egress_gbit"), "unknown field `egress_gbit`"),
    (TOML.replace("100.0", '"fast"'), "Expected `float`, got `str` - at `$.prfaas[0].egress_gbps`"),
    (TOML.replace("100.0", "0.0"), "egress_gbps must be > 0"),
    (TOML.replace('decode = ["http://d:1"]', ""), "at least one decode worker"),
    (TOML.replace("threshold_tokens = 20236", "threshold_tokens = 20236\nmax_threshold_tokens = 10"),
     "need 0 <= threshold_tokens <= max_threshold_tokens"),
    ("decode = [", "router config"),
])
def test_mistakes_name_the_field(tmp_path, text, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("$", r"\$").replace(".", r"\.")) as info:
        router_config.load(write(tmp_path, text))
    assert str(tmp_path) in str(info.value)


def test_flags_add_workers_and_override_the_file(tmp_path):
    args = parser().parse_args(["router", "--config", str(write(tmp_path, TOML)), "--port", "0", "--decode", "http://d:2",
                                "--kv-fallback", "error", "--control-interval", "1"])
    config = from_args(args)
    assert config.decode == ["http://d:1", "http://d:2"]
    assert config.kv_fallback == "error" and config.control.interval_s == 1.0
    assert [c.name for c in config.prfaas] == ["east"]


def test_prfaas_flags_make_one_cluster():
    args = parser().parse_args(["router", "--port", "0", "--decode", "http://d", "--prfaas", "http://p",
                                "--prfaas-threshold", "512", "--egress-gbps", "0.1"])
    (cluster,) = from_args(args).prfaas
    assert (cluster.name, cluster.prefill, cluster.threshold_tokens, cluster.egress_gbps) == ("prfaas", ["http://p"], 512,
                                                                                             0.1)


def test_no_prefill_worker_at_all_is_refused():
    with pytest.raises(UsageError, match="at least one prefill worker"):
        from_args(parser().parse_args(["router", "--port", "0", "--decode", "http://d"]))


@pytest.mark.parametrize("text, message", [
    (TOML.replace('prefill = ["http://l:1"]', 'prefill = ["http://d:1"]'),
     "worker http://d:1 is listed twice (decode and prefill)"),
    (TOML.replace('"http://p:1", "http://p:2"', '"http://p:1", "http://p:1"'),
     "worker http://p:1 is listed twice (prfaas 'east' and prfaas 'east')"),
    (TOML.replace('{ "http://d:1" =', '{ "http://typo:1" ='), "kv_addresses names ['http://typo:1'], which are not decode"),
    ("prefill_timeout_s = -1\n" + TOML, "prefill_timeout_s must be > 0, got -1"),
    (TOML.replace("threshold_tokens = 20236", "threshold_tokens = 20236\ncontroller = { busy_utilisation = 0.9 }"),
     "'east': [controller] has an unknown setting"),
    (TOML.replace("threshold_tokens = 20236", "threshold_tokens = 20236\ncontroller = { idle_utilization = 0.95 }"),
     "idle_utilization=0.95 must be below busy_utilization=0.85"),
])
def test_inconsistent_pools_are_refused(tmp_path, text, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        router_config.load(write(tmp_path, text))


def test_cluster_flags_without_a_cluster_are_refused():
    with pytest.raises(UsageError, match="give --prfaas"):
        from_args(parser().parse_args(["router", "--port", "0", "--decode", "http://d", "--prefill", "http://l",
                                       "--egress-gbps", "1"]))
    with pytest.raises(SystemExit):  # argparse: "argument --control-interval: '0' is not a number > 0"
        from_args(parser().parse_args(["router", "--port", "0", "--decode", "http://d", "--prefill", "http://l",
                                       "--control-interval", "0"]))


@pytest.mark.parametrize("toml,message", [
    ('decode = ["d:8200"]\nprefill = ["http://p:8100"]\n',
     "decode worker: 'd:8200' is not an http:// URL (e.g. 'http://d:8200')"),
    ('decode = ["http://d:8200"]\n[[prfaas]]\nname = "far"\nprefill = ["ftp://p:1"]\negress_gbps = 1.0\n',
     "PrfaaS cluster 'far': prefill worker: 'ftp://p:1' is not an http:// URL (e.g. 'http://10.0.0.2:8100')"),
    ('decode = ["http://d:8200"]\n[[prfaas]]\nname = "far"\nprefill = ["http://p:1"]\negress_gbps = 1.0\n'
     'kv_addresses = { "http://d:8200" = "d" }\n',
     "PrfaaS cluster 'far': kv_addresses['http://d:8200']: 'd' is not HOST:PORT (e.g. '10.0.0.2:7800')"),
])
def test_a_config_file_with_a_bad_address_is_refused_naming_it(tmp_path, toml, message):
    path = tmp_path / "router.toml"
    path.write_text(toml)
    with pytest.raises(ValueError) as error:
        router_config.load(path)
    assert message in str(error.value)


def test_worker_urls_lose_a_trailing_slash():
    config = router_config.merge(None, prefill=["http://p:8100/"], decode=["http://d:8200/"])
    assert (config.prefill, config.decode) == (["http://p:8100"], ["http://d:8200"])
