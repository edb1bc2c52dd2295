"""The one rule for a model's name and a version folder's name, shared by export, serve and the monitor."""

import pytest

from histoserve.formats.repository_layout import is_model_name, is_version_name, versions


@pytest.mark.parametrize("text, expected", [("digits", True), ("digits-int8", True), ("a.b_c", True), ("digits\n", False),
                                            ("-digits", False), ("", False), ("dig its", False), ("../x", False)])
def test_model_names(text, expected):
    assert is_model_name(text) is expected


@pytest.mark.parametrize("text, expected", [("1", True), ("12", True), ("0", False), ("01", False), ("1\n", False),
                                            ("²", False), ("١", False), (".staging-3-x", False), ("1.0", False)])
def test_version_names(text, expected):
    assert is_version_name(text) is expected


def test_versions_lists_only_version_folders(tmp_path):
    for name in ("1", "3", "10", "01", "²", ".staging-4-abc"):
        (tmp_path / name).mkdir()
    (tmp_path / "2").write_text("a file, not a version")
    assert versions(tmp_path) == [1, 3, 10]
