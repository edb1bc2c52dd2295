"""TritonServer's parts on their own, without a Triton: its command line as data (TritonFlags) and
poll mode's repository follower. The process itself is started by every test that serves."""

import shutil
import time

import pytest

from histoserve.export.publish import publish
from histoserve.formats.admin import AdminKey
from histoserve.formats.repository_layout import read_config
from histoserve.serve.repository_follower import RepositoryFollower
from histoserve.serve.server import TritonServer
from histoserve.serve.triton_flags import GrpcTls, Ports, ServerError, TritonFlags
from tests.conftest import MODEL
from tests.k8s.manifests import deployment_args, flag

KEY_VARIABLE = "$(TRITON_ADMIN_KEY)"


def test_the_flags_alone_render_the_policies_the_deployment_runs_with():
    """The cpu overlay's pod and a local server differ in ports, addresses and the drain time only:
    the same readiness, keepalive, HTTP and admin-key flags, rendered from TritonFlags."""
    key = AdminKey.generate()
    args, _ = deployment_args("overlays/cpu")
    pod = [a.replace(KEY_VARIABLE, key.value) for a in args]
    local = TritonFlags(Ports(18000, 18001, 18002), admin_key=key, allow_http=False).flags()
    for name in ("model-control-mode", "strict-readiness", "exit-on-error", "allow-http", "grpc-restricted-protocol",
                 "http-restricted-api", "grpc-keepalive-time", "grpc-keepalive-timeout", "grpc-keepalive-permit-without-calls",
                 "grpc-http2-max-pings-without-data", "grpc-http2-min-recv-ping-interval-without-data", "allow-metrics",
                 "log-verbose"):
        assert flag(local, name) == flag(pod, name) or (name == "model-control-mode" and flag(local, name) is None
                                                        and flag(pod, name) == "none"), name
    assert flag(local, "grpc-port") == "18001" and flag(local, "grpc-address") == "127.0.0.1"
    assert flag(TritonFlags(admin_key=key, restrict_admin=False).flags(), "grpc-restricted-protocol") is None  # the Deployment's own


def test_the_flags_follow_poll_mode_http_and_extra_arguments(tmp_path):
    poll = TritonFlags(model_control_mode="poll", repository_poll_s=0.3).flags()
    assert flag(poll, "model-control-mode") == "poll" and flag(poll, "repository-poll-secs") == "1"
    assert TritonFlags().http_enabled and not TritonFlags(allow_http=False).http_enabled
    assert not TritonFlags(extra_args=["--allow-http=false"]).http_enabled  # a Deployment's own flags count
    assert TritonFlags(allow_http=False, extra_args=["--allow-http=true"]).http_enabled  # the last one wins
    assert TritonFlags(extra_args=["--log-verbose=1"]).flags()[-1] == "--log-verbose=1"
    with pytest.raises(ServerError, match="'explicit': use 'none' or 'poll'"):
        TritonFlags(model_control_mode="explicit")
    tls = TritonFlags(grpc_tls=GrpcTls(tmp_path / "server.pem", tmp_path / "server.key"))
    with pytest.raises(ServerError, match="server.pem does not exist"):
        tls.flags()
    (tmp_path / "server.pem").write_text("certificate")
    (tmp_path / "server.key").write_text("key")
    assert flag(tls.flags(), "grpc-use-ssl") == "true" and flag(tls.flags(), "grpc-use-ssl-mutual") is None


def test_a_server_is_configured_through_its_flags_or_their_keywords():
    key = AdminKey.generate()
    flags = TritonFlags(Ports(1, 2, 3), "127.0.0.2", admin_key=key, allow_http=False)
    server = TritonServer("repo", flags=flags)
    assert server.flags is flags and server.grpc_url == "127.0.0.2:2" and not server.http_enabled
    same = TritonServer("repo", Ports(1, 2, 3), "127.0.0.2", admin_key=key, allow_http=False)
    assert same.flags == flags
    assert TritonServer("repo").admin_key is not None  # no key given: one made for this run
    for both in ({"ports": Ports(4, 5, 6)}, {"log_verbose": 1}, {"extra_args": ["--exit-timeout-secs=5"]}):
        with pytest.raises(TypeError, match="not both"):  # a keyword beside flags= would be ignored
            TritonServer("repo", flags=flags, **both)
    assert server.failed_versions == {} and server.repository_syncs == 0  # no follower before a poll-mode start


def test_the_follower_alone_mirrors_a_newly_published_version_and_names_a_failed_one_once(repository, tmp_path, capfd):
    source, local = tmp_path / "store", tmp_path / "local"
    shutil.copytree(repository / MODEL, source / MODEL)
    index: list[dict] = []
    follower = RepositoryFollower(source, local, poll_s=0.05, index=lambda: index, server="here").start()
    try:
        config, labels = read_config(source / MODEL / "config.pbtxt"), (source / MODEL / "labels.txt").read_text().splitlines()
        wait_until(lambda: (local / MODEL / "1" / "model.onnx").exists())
        publish(source, config, labels, source / MODEL / "1" / "model.onnx")  # version 2
        wait_until(lambda: (local / MODEL / "2" / "model.onnx").exists())
        assert follower.failed_versions == {}
        index.append({"name": MODEL, "version": "2", "state": "UNAVAILABLE", "reason": "Protobuf parsing failed"})
        syncs = follower.syncs
        wait_until(lambda: follower.syncs >= syncs + 3)
    finally:
        follower.stop()
    assert follower.failed_versions == {(MODEL, "2"): "Protobuf parsing failed"}
    assert capfd.readouterr().err.count(f"model '{MODEL}' version 2 failed to load") == 1
    stopped_at = follower.syncs
    time.sleep(0.2)
    assert follower.syncs == stopped_at


def test_the_follower_keeps_going_when_the_index_cannot_be_read(repository, tmp_path):
    def unreachable():
        raise ConnectionError("Triton is restarting")

    follower = RepositoryFollower(repository, tmp_path / "local", poll_s=60, index=unreachable)
    follower.sync_once()
    assert follower.syncs == 1 and follower.failed_versions == {} and (tmp_path / "local" / MODEL).is_dir()


def wait_until(condition, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.parametrize("argv", [["--no-http", "stage", "--store", ".", "--target", "t", "--allow-unsigned"],
                                  ["--grpc-port", "9", "golden-gate", "--repository", ".", "--model", "m", "--version", "1"]])
def test_the_local_server_s_options_before_a_pod_command_are_refused_not_dropped(argv, capsys):
    from histoserve.serve.__main__ import main

    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    command = next(word for word in argv if word in ("stage", "golden-gate"))
    assert f"options of the local server; `{command}` takes only its own" in capsys.readouterr().err
