"""The admin key: where it comes from, what it may hold, and the flags and headers made of it."""

import os

import pytest

from histoserve.formats.admin import ENVIRONMENT_VARIABLE, RESTRICTED_GROUPS, AdminKey, AdminKeyError, refused


def test_a_key_comes_from_the_file_first_then_the_environment(tmp_path, monkeypatch):
    file = tmp_path / "key"
    file.write_text("from-the-file-0123456789\n")
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "from-the-environment-0123")
    assert AdminKey.resolve(file).value == "from-the-file-0123456789"
    assert AdminKey.resolve(None).value == "from-the-environment-0123"
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "  ")
    assert AdminKey.resolve(None) is None


@pytest.mark.parametrize("value", ["x" * 15, "x" * 257, "sixteen:characters", "key=value-0123456789", "with space 0123456",
                                   "ünïcode-0123456789"])
def test_a_key_triton_or_a_header_would_mangle_is_refused(value, monkeypatch):
    with pytest.raises(AdminKeyError):
        AdminKey(value)
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, value)
    with pytest.raises(AdminKeyError, match=ENVIRONMENT_VARIABLE):
        AdminKey.resolve(None)


def test_a_generated_key_is_written_for_its_owner_only_and_never_shown(tmp_path):
    key = AdminKey.generate()
    path = key.write(tmp_path / "admin-key")
    assert os.stat(path).st_mode & 0o777 == 0o600 and AdminKey.from_file(path) == key
    assert key.value not in repr(key)
    with pytest.raises(FileExistsError):  # never overwrites
        key.write(path)


def test_the_flags_restrict_the_admin_groups_over_grpc_and_http():
    key = AdminKey("k" * 20)
    assert key.triton_flags() == [
        f"--grpc-restricted-protocol={','.join(RESTRICTED_GROUPS)}:admin-key={'k' * 20}",
        f"--http-restricted-api={','.join(RESTRICTED_GROUPS)}:admin-key={'k' * 20}",
    ]
    assert key.grpc_headers() == {"triton-grpc-protocol-admin-key": "k" * 20} and key.http_headers() == {"admin-key": "k" * 20}
    assert set(RESTRICTED_GROUPS).isdisjoint({"health", "metadata", "inference", "model-config"})  # a client's needs stay open


def test_tritons_refusal_is_told_apart_from_other_failures():
    assert refused("This protocol is restricted, expecting header 'triton-grpc-protocol-admin-key'")
    assert refused("This API is restricted, expecting header 'admin-key'")
    assert not refused("failed to connect to all addresses") and not refused("")
