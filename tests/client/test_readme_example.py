"""The client guide's library example (docs/guides/client.md), run as written (only the server address and
data folder differ)."""

import re

from tests.conftest import ROOT, run_cli


def readme_example() -> str:
    text = (ROOT / "docs" / "guides" / "client.md").read_text()
    start = text.index("In a service (runs as written")
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def test_the_readme_library_example_runs_against_the_real_server(server, digits_root):
    code = readme_example()
    assert "localhost:8001" in code and "data/digits/test/3" in code
    code = code.replace("localhost:8001", server.grpc_url).replace("data/digits/test/3", str(digits_root / "test" / "3"))
    result = run_cli("-c", code)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("ModelContract(name='digits'")
    files = sorted((digits_root / "test" / "3").glob("*.png"))[:4]
    assert [line.split()[0] for line in lines[1:5]] == [str(f) for f in files]
    assert all(line.count("Prediction(") == 3 for line in lines[1:5])  # top 3 for each file
    assert lines[5].count("Prediction(") == 4  # infer: top 1 for each of the 4 images
    assert not [m for m in ("torch", "train", "export") if f"import {m}" in code or f"from {m}" in code]
