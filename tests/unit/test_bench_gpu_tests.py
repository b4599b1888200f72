"""`bench gpu`'s CUDA-test part, run as a real pytest subprocess: only a clean pass passes the bench."""
from __future__ import annotations

from pathlib import Path

import pytest

from star_scale.bench.gpu import gpu_tests

HEADER = "import time\nimport pytest\npytestmark = pytest.mark.gpu\n"
BODIES = {
    "passes": "def test_a():\n    assert True\n",
    "skips": "def test_a():\n    pytest.skip('needs a CUDA device')\n",
    "fails": "def test_a():\n    assert 1 == 2\n",
    "errs": "def test_a(no_such_fixture):\n    pass\n",
    "breaks": "import no_such_module_anywhere\n",
    "hangs": "def test_a():\n    time.sleep(60)\n",
}


def _folder(tmp_path: Path, kind: str) -> Path:
    folder = tmp_path / kind
    folder.mkdir()
    (folder / "conftest.py").write_text("def pytest_configure(config):\n"
                                        "    config.addinivalue_line('markers', 'gpu: CUDA only')\n")
    if kind != "empty":
        (folder / "test_case.py").write_text(HEADER + BODIES[kind])
    return folder


@pytest.mark.parametrize("kind,cuda,ok,says", [
    ("passes", True, True, "1 passed"),
    ("skips", False, True, "1 skipped"),  # the reduced CPU run: the CUDA tests skip themselves
    ("skips", True, False, "nothing passed"),  # on a GPU every test skipped is no check at all
    ("fails", True, False, "exit 1"),
    ("errs", True, False, "1 error"),
    ("breaks", False, False, "exit 2"),  # a collection error
    ("empty", False, False, "no tests collected"),
    ("hangs", True, False, "no result within 5s"),
])
def test_only_a_clean_pass_passes(tmp_path, kind, cuda, ok, says):
    got_ok, text = gpu_tests(5 if kind == "hangs" else 120, cuda, _folder(tmp_path, kind))
    assert got_ok is ok and says in text, text
    assert ok or text.startswith("failed: "), text


def test_a_missing_folder_fails_on_a_gpu_only(tmp_path):
    assert gpu_tests(10, True, tmp_path / "gpu") == (False, "failed: gpu not found (run from a checkout)")
    assert gpu_tests(10, False, tmp_path / "gpu") == (True, "skipped: gpu not found (run from a checkout)")


def test_rows_past_their_sections_budget_are_named_and_fail_the_bench(monkeypatch, capsys):
    from star_scale.bench import gpu

    monkeypatch.setattr(gpu, "SECTION_ENDS_S", dict.fromkeys(gpu.SECTION_ENDS_S, -1))  # every deadline passed
    assert gpu.main(["--skip", "zero3,tests"]) == 1
    text = " ".join(capsys.readouterr().out.split())
    for case in ("train tiny ar", "train tiny star", "attention head 16 flex", "attention head 20 picked",
                 "sampling CFG 2.0 batch 2"):
        assert f"{case} {gpu.OVER_BUDGET}" in text, case
