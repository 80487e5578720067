"""`serve --replicas`'s flags (cli/scale_out.py): checked with the other settings, one line naming the flag or
the variable that was set. Before, Ray's pydantic validation printed several lines naming model fields
(`num_replicas`) and pydantic's URL, only after the models were located."""

from __future__ import annotations

import sys

import pytest

from openrerank.cli.main import build_parser, main, serve_settings
from openrerank.cli.options import UsageError
from openrerank.cli.scale_out import replica_names, replica_options


def config(argv: list[str], environ: dict[str, str] | None = None):
    return serve_settings(build_parser().parse_args(["serve", *argv]), environ or {})[0]


@pytest.mark.parametrize(("argv", "environ", "expected"), [
    (["--replicas", "-1"], {}, "--replicas -1: must be at least 1"),
    (["--replicas", "0"], {}, "--replicas 0: must be at least 1"),
    ([], {"OPENRERANK_REPLICAS": "-1"}, "OPENRERANK_REPLICAS='-1': must be at least 1"),
    (["--max-replicas", "0"], {}, "--max-replicas 0: must be at least 1"),
    (["--replicas", "2", "--max-replicas", "1"], {}, "--replicas 2: more than --max-replicas 1"),
    (["--replicas", "2"], {"OPENRERANK_MAX_REPLICAS": "1"}, "--replicas 2: more than OPENRERANK_MAX_REPLICAS='1'"),
    (["--replica-cpus", "-0.5"], {}, "--replica-cpus -0.5: must be a finite number of CPUs"),
    ([], {"OPENRERANK_REPLICA_CPUS": "nan"}, "OPENRERANK_REPLICA_CPUS='nan': must be a finite number of CPUs"),
    (["--ray-metrics-port", "70000"], {}, "--ray-metrics-port 70000: must be 0-65535"),
    (["--replica-option", "foo"], {}, "--replica-option 'foo': expected KEY=VALUE"),
    ([], {"OPENRERANK_REPLICA_OPTION": "a=1,=2"}, "OPENRERANK_REPLICA_OPTION='a=1,=2', item '=2': expected KEY=VALUE"),
])
def test_a_bad_scale_out_setting_is_one_line_naming_what_was_set(argv, environ, expected):
    with pytest.raises(UsageError) as err:
        config(argv, environ)
    assert expected in str(err.value)
    assert "\n" not in str(err.value) and "num_replicas" not in str(err.value)


@pytest.mark.parametrize(("argv", "environ", "expected"), [
    (["--replicas", "2", "--header-timeout", "3"], {},
     "--header-timeout: not served with --replicas 2: Serve's proxy reads the request headers"),
    (["--max-replicas", "2"], {"OPENRERANK_MAX_HEADER_BYTES": "100000"},
     "OPENRERANK_MAX_HEADER_BYTES='100000': not served with --max-replicas 2: Serve's proxy reads"),
    (["--replicas", "2", "--header-timeout", "10"], {"OPENRERANK_MAX_HEADER_BYTES": "1000"},  # the default too
     "--header-timeout, OPENRERANK_MAX_HEADER_BYTES='1000': not served with --replicas 2"),
    (["--replicas", "2", "--grpc-port", "8001"], {}, "--grpc-port: not served with --replicas 2: gRPC is"),
    ([], {"OPENRERANK_REPLICAS": "2", "NIM_GRPC_API_PORT": "8001"},
     "NIM_GRPC_API_PORT='8001': not served with OPENRERANK_REPLICAS='2': gRPC is"),
])
def test_what_replicas_cannot_serve_is_refused_naming_only_what_was_given(argv, environ, expected):
    """Serve's proxy holds the connection: --header-timeout and --max-header-bytes were accepted and ignored under
    --replicas (a 2 MB header got 200), and the gRPC/TLS refusal named `--grpc-port and --ssl-certfile/
    --ssl-keyfile` whatever had been set, a NIM variable included."""
    with pytest.raises(UsageError) as err:
        config(argv, environ)
    line = str(err.value)
    assert expected in line and "docs/scale-out.md, \"What --replicas refuses\"" in line
    assert "\n" not in line and line.count("--ssl") == 0 and ("grpc" in expected.lower()) == ("grpc" in line.lower())


def test_tls_files_are_refused_with_replicas_named_as_given(tmp_path):
    import trustme

    cert = trustme.CA().issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "c.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "k.pem"))
    with pytest.raises(UsageError) as err:
        config(["--replicas", "2", "--ssl-certfile", str(tmp_path / "c.pem")],
               {"NIM_SSL_KEY_PATH": str(tmp_path / "k.pem")})
    assert f"--ssl-certfile, NIM_SSL_KEY_PATH={str(tmp_path / 'k.pem')!r}: not served with " \
        "--replicas 2: TLS ends at Serve's proxy" in str(err.value)


def test_the_same_settings_serve_one_process():
    cfg = config(["--header-timeout", "3", "--grpc-port", "8001"], {"OPENRERANK_MAX_HEADER_BYTES": "1000"})
    assert (cfg.header_timeout, cfg.max_header_bytes, cfg.grpc_port) == (3, 1000, 8001)


def test_good_scale_out_settings_pass_and_become_replica_options():
    args = build_parser().parse_args(["serve", "--replicas", "2", "--max-replicas", "4", "--replica-option",
                                      "num_cpus=9", "--replica-option", "target_ongoing_requests=8"])
    serve_settings(args, {"OPENRERANK_REPLICA_CPUS": "0.5"})
    assert replica_options(args) == {"num_cpus": 0.5, "target_ongoing_requests": "8", "num_replicas": 2,
                                     "max_replicas": 4}  # the dedicated flags win over --replica-option
    shown = {"replica-cpus": "OPENRERANK_REPLICA_CPUS='0.5'"}
    assert replica_names(args, shown) == {"num_cpus": "OPENRERANK_REPLICA_CPUS='0.5'",
                                          "target_ongoing_requests": "--replica-option target_ongoing_requests=8",
                                          "num_replicas": "--replicas 2", "max_replicas": "--max-replicas 4"}


def test_an_autoscaled_deployment_without_replicas_starts_at_its_floor():
    """It started at 1 replica: `--max-replicas 2 --replica-option min_replicas=2` was refused by Ray's check
    ("num_replicas=1 must lie within min_replicas=2 and max_replicas=2"), a count the operator never gave."""
    def options(*argv: str) -> dict:
        args = build_parser().parse_args(["serve", "--max-replicas", "3", *argv])
        serve_settings(args, {})
        return replica_options(args)

    assert options("--replica-option", "min_replicas=2")["num_replicas"] == "2"
    assert options()["num_replicas"] == 1
    assert options("--replica-option", "num_replicas=3", "--replica-option", "min_replicas=2")["num_replicas"] == "3"
    assert options("--replicas", "2", "--replica-option", "min_replicas=1")["num_replicas"] == 2


@pytest.mark.parametrize(("flag", "field", "values"), [
    ("replicas", "num_replicas", [-1, 0, 1, 2]),
    ("max-replicas", "max_replicas", [-1, 0, 1, 2]),
    ("replica-cpus", "num_cpus", [-1.0, -0.01, 0.0, 0.5, float("inf"), float("nan")]),
])
def test_the_cli_accepts_what_ray_accepts(flag, field, values):
    """The CLI's bounds are ReplicaOptions' (declared there): a value passes the CLI iff Ray takes it (inf
    CPUs aside: Ray takes it, and it exceeds every machine)."""
    pytest.importorskip("ray.serve")
    from pydantic import ValidationError

    from openrerank.server.ray_serve import ReplicaOptions

    for value in values:
        try:
            config([f"--{flag}", str(value)])
            cli = True
        except UsageError:
            cli = False
        try:
            ReplicaOptions(**{field: value})
            ray = value != float("inf")
        except ValidationError:
            ray = False
        assert cli == ray, (flag, value)


def test_what_only_ray_refuses_is_one_line_naming_the_flags(capsys):
    pytest.importorskip("ray.serve")
    assert main(["serve", "--replicas", "2", "--replica-option", "bogus=1", "--replica-option",
                 "target_ongoing_requests=abc"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "errors.pydantic.dev" not in err, err
    assert "--replica-option bogus=1: not a replica option" in err, err
    assert "--replica-option target_ongoing_requests=abc: Input should be a valid number" in err, err
    assert main(["serve", "--replicas", "2", "--max-replicas", "4", "--replica-option", "min_replicas=3"]) == 2
    err = capsys.readouterr().err
    assert "--replicas 2 must lie within --replica-option min_replicas=3 and --max-replicas 4" in err, err
    assert main(["serve", "--replicas", "2", "--replica-option", "num_cpus=100000"]) == 2
    err = capsys.readouterr().err  # named once, as set (the flag's own name was once added to it)
    assert "error: --replica-option num_cpus=100000 per replica for 2 replicas exceeds the " in err, err


def test_without_ray_installed_it_is_one_line_naming_the_extra(monkeypatch, capsys):
    """The `ray` extra is optional: without it, `serve --replicas` says how to install it (exit 2), no traceback."""
    for module in ("ray", "ray.serve"):
        monkeypatch.setitem(sys.modules, module, None)  # `import ray` fails here as it does where Ray is absent
    assert main(["serve", "--replicas", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "serve --replicas needs the 'ray' extra" in err and "scripts/setup.sh ray" in err, err
