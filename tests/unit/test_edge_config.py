"""What the edge is configured to do, read from the rendered configs and commands (the running
behaviour is tested in tests/faults/test_edge_faults.py)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from canaryflow.contracts import Endpoints, Routes
from canaryflow.dataplane.envoy_bootstrap import render_bootstrap
from canaryflow.dataplane.envoy_config import (
    EDGE_HEADERS,
    FEEDBACK_PATH,
    MIRROR_HEADER,
    PROBE_TARGET_HEADER,
    render_route_config,
)
from canaryflow.errors import ConfigError
from canaryflow.local.stack import EmbeddedStack, admin_url_of, model_service


def bootstrap(tmp_path: Path, **extra: int) -> dict:  # type: ignore[type-arg]
    return render_bootstrap(
        service="svc",
        listen_host="0.0.0.0",
        listen_port=10000,
        admin_port=10001,
        upstreams={"stable": ("127.0.0.1", 9000)},
        route_path=tmp_path / "routes" / "routes.yaml",
        **extra,
    )


def test_both_listeners_drop_client_edge_headers_and_cap_bodies(tmp_path: Path) -> None:
    listeners = bootstrap(tmp_path, synthetic_port=10002, max_request_bytes=4096)[
        "static_resources"
    ]["listeners"]
    assert [(x["name"], x["address"]["socket_address"]["address"]) for x in listeners] == [
        ("client", "0.0.0.0"),
        ("synthetic", "127.0.0.1"),  # never on a public interface
    ]
    for listener in listeners:
        manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
        assert manager["use_remote_address"] and not manager["preserve_external_request_id"]
        filters = {f["name"]: f["typed_config"] for f in manager["http_filters"]}
        mutations = filters["envoy.filters.http.header_mutation"]["mutations"]
        removed = {m["remove"] for m in mutations["request_mutations"] if "remove" in m}
        synthetic = listener["name"] == "synthetic"
        # Users cannot name a probe's target; the synthetic listener's probes can.
        assert removed == set(EDGE_HEADERS) | (set() if synthetic else {PROBE_TARGET_HEADER})
        [early] = manager["early_header_mutation_extensions"]  # before the route is picked
        assert early["typed_config"]["mutations"] == mutations["request_mutations"]
        added = [m["append"] for m in mutations["request_mutations"] if "append" in m]
        assert [a["header"]["key"] for a in added] == (
            ["x-canaryflow-synthetic"] if synthetic else []
        )
        assert filters["envoy.filters.http.buffer"]["max_request_bytes"] == 4096
        assert manager["rds"]["route_config_name"] == "canaryflow"  # the same routes


def test_only_the_mirror_policy_sets_the_mirror_header() -> None:
    text = render_route_config(
        Routes(service="svc", stable="1", shadow="2", mirror_percent=50), version=3
    )
    assert text.count(MIRROR_HEADER) == 1
    assert "request_headers_mutations" in text


def test_feedback_goes_to_stable_alone_ahead_of_the_split() -> None:
    routes = Routes(
        service="svc", stable="1", canary="2", weight=100, shadow="3", mirror_percent=100
    )
    text = render_route_config(routes, version=4, route_timeout_s=30)
    [host] = json.loads(text.split("\n", 1)[1])["resources"][0]["virtual_hosts"]
    first, *probes, catch_all = host["routes"]
    assert [p["route"]["cluster"] for p in probes] == ["stable", "canary", "shadow"]
    for probe in probes:  # synthetic probes only; never split or mirrored
        headers = {h["name"]: h["string_match"]["exact"] for h in probe["match"]["headers"]}
        assert headers == {
            "x-canaryflow-synthetic": "1",
            PROBE_TARGET_HEADER: probe["route"]["cluster"],
        }
        assert "request_mirror_policies" not in probe["route"]
    assert first["match"] == {"path": FEEDBACK_PATH}
    assert first["route"] == {
        "cluster": "stable",
        "host_rewrite_literal": "svc",
        "timeout": "30.000s",
    }
    assert "request_headers_to_add" not in first  # no role, version or shadow headers
    assert catch_all["match"] == {"prefix": "/"} and "weighted_clusters" in catch_all["route"]
    [host] = json.loads(render_route_config(None, version=1).split("\n", 1)[1])["resources"][0][
        "virtual_hosts"
    ]
    assert [r["match"] for r in host["routes"]] == [{"prefix": "/"}]  # no routes yet: all 503


def test_a_cap_below_one_byte_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        bootstrap(tmp_path, max_request_bytes=0)
    with pytest.raises(ConfigError, match="at least 1 byte"):
        EmbeddedStack(tmp_path, max_request_bytes=0)
    assert EmbeddedStack(tmp_path, max_request_bytes=2048).max_request_bytes == 2048


def test_up_refuses_bad_body_caps_and_users_without_a_service(tmp_path: Path) -> None:
    from canaryflow.app.cli import main

    home = ["--home", str(tmp_path)]
    assert main([*home, "up", "--max-body-bytes", "0"]) != 0
    assert main([*home, "up", "--users", "50"]) != 0
    assert main([*home, "up", "--service", "svc", "--users", "-1"]) != 0
    assert not (tmp_path / "stack.json").exists(), "nothing was started"


def test_the_stack_runs_services_with_an_admin_port_and_the_cap(tmp_path: Path) -> None:
    endpoints = Endpoints(home=str(tmp_path), mlflow_uri="http://mlflow", keys_dir="keys")
    process = model_service(tmp_path, "primary", "svc", endpoints, max_body_bytes=2048)
    command = list(process.command)
    assert command[command.index("--max-body-bytes") + 1] == "2048"
    assert admin_url_of(process).startswith("http://127.0.0.1:")
    assert command[command.index("--admin-port") + 1] != command[command.index("--port") + 1]


def test_envoy_accepts_the_rendered_bootstrap(tmp_path: Path) -> None:
    """`envoy --mode validate`: every filter and field exists in the Envoy we ship."""
    import yaml

    from canaryflow.local.envoy import envoy_binary

    routes = tmp_path / "routes" / "routes.yaml"
    routes.parent.mkdir()
    routes.write_text(
        render_route_config(
            Routes(service="svc", stable="1", shadow="2", mirror_percent=50), version=1
        )
    )
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(bootstrap(tmp_path, synthetic_port=10002)))
    done = subprocess.run(
        [str(envoy_binary()), "--mode", "validate", "-c", str(path), "--base-id", "4242",
         "--disable-hot-restart", "--log-level", "error"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_socket_path_upstream_is_an_envoy_pipe(tmp_path: Path) -> None:
    sock = tmp_path / "sockets" / "service-primary.sock"
    clusters = render_bootstrap(
        service="svc",
        listen_host="127.0.0.1",
        listen_port=10000,
        admin_port=10001,
        upstreams={"stable": sock, "shadow": ("127.0.0.1", 9001)},
        route_path=tmp_path / "routes" / "routes.yaml",
    )["static_resources"]["clusters"]
    addresses = {
        c["name"]: c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        for c in clusters
    }
    assert addresses == {
        "stable": {"pipe": {"path": str(sock)}},
        "shadow": {"socket_address": {"address": "127.0.0.1", "port_value": 9001}},
    }


def test_the_stack_gives_each_service_an_owner_only_socket(tmp_path: Path) -> None:
    from canaryflow.local.stack import socket_folder

    endpoints = Endpoints(home=str(tmp_path), mlflow_uri="http://mlflow", keys_dir="keys")
    folder = socket_folder(tmp_path)
    assert folder == tmp_path / "sockets" and folder.stat().st_mode & 0o777 == 0o700
    process = model_service(tmp_path, "primary", "svc", endpoints, uds=folder / "p.sock")
    command = list(process.command)
    assert command[command.index("--uds") + 1] == str(folder / "p.sock")
    deep = tmp_path / ("d" * 120)
    other = socket_folder(deep)  # too long for a socket address: a private temporary folder
    try:
        assert not other.is_relative_to(deep) and other.stat().st_mode & 0o777 == 0o700
    finally:
        other.rmdir()


def test_serve_makes_its_socket_owner_only_and_refuses_unsafe_places(tmp_path: Path) -> None:
    import stat

    from canaryflow.dataplane.serve import bind_unix, parse_args

    _, at = parse_args(
        ["--service", "s", "--port", "1", "--admin-port", "2", "--uds", str(tmp_path / "a.sock")]
    )
    assert at.uds == tmp_path / "a.sock"
    path = tmp_path / "fresh" / "service.sock"
    sock = bind_unix(path)
    try:
        assert stat.S_ISSOCK(path.stat().st_mode) and path.stat().st_mode & 0o777 == 0o600
        assert path.parent.stat().st_mode & 0o777 == 0o700
    finally:
        sock.close()
    bind_unix(path).close()  # a stale socket from an earlier run is replaced
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    with pytest.raises(ConfigError, match="writable by others"):
        bind_unix(shared / "service.sock")
    (tmp_path / "file").write_text("not a socket")
    with pytest.raises(ConfigError, match="not a socket"):
        bind_unix(tmp_path / "file")
    with pytest.raises(ConfigError, match="too long"):
        bind_unix(tmp_path / ("x" * 120) / "service.sock")
