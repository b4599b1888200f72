"""setup.py's bounds and the start-up check agree, and a DeepSpeed without a name star-scale uses fails in one line."""
import importlib
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from tests.conftest import TINY
from star_scale.parallel.versions import TESTED, USED, VersionError, check_versions, in_tested_range, requirement

ROOT = Path(__file__).resolve().parents[2]


def test_installed_versions_pass_and_are_the_tested_ones():
    check_versions()
    for dist in TESTED:
        assert in_tested_range(dist, importlib.metadata.version(dist)), dist


def test_setup_py_pins_the_same_ranges():
    setup = (ROOT / "setup.py").read_text()
    for dist in TESTED:
        assert f'"{requirement(dist)}"' in setup, requirement(dist)


@pytest.mark.parametrize("version,ok", [("0.19.0", True), ("0.19.8", True), ("0.20.0", False), ("0.18.9", False),
                                        ("0.19.0rc1", True)])
def test_tested_range(version, ok):
    assert in_tested_range("deepspeed", version) is ok


def test_a_missing_name_is_named_with_the_version():
    missing = "deepspeed.utils"

    def import_module(name):
        real = importlib.import_module(name)
        if name != missing:
            return real
        stub = types.SimpleNamespace(**vars(real))  # the real module less one function
        del stub.safe_get_local_fp32_param
        return stub

    with pytest.raises(VersionError) as e:
        check_versions(version_of=lambda d: "0.21.0" if d == "deepspeed" else importlib.metadata.version(d),
                       import_module=import_module)
    assert str(e.value) == ("deepspeed 0.21.0: star-scale needs deepspeed.utils.safe_get_local_fp32_param, which this "
                            "version lacks; tested with deepspeed>=0.19,<0.20 (pip install 'deepspeed>=0.19,<0.20')")


def test_every_name_the_parallel_package_imports_is_checked():
    """A new `from deepspeed... import x` in star_scale/parallel/ must be added to USED."""
    checked = {(m, n.split(".")[0]) for _, m, names in USED for n in names}
    src = "\n".join(p.read_text() for p in (ROOT / "star_scale" / "parallel").glob("*.py"))
    found = re.findall(r"from ((?:deepspeed|megatron)[\w.]*) import \(([^)]*)\)", src)
    found += re.findall(r"from ((?:deepspeed|megatron)[\w.]*) import ([^(\n]+)$", src, re.M)
    assert len(found) >= 5
    for module, names in found:
        for name in filter(None, (n.split(" as ")[0].strip() for n in names.split(","))):
            used = (module, name) in checked or f"{module}.{name}" in {m for _, m, _ in USED}  # a name or a module
            assert used, f"{module}.{name} is used but not in parallel/versions.py USED"


def test_cli_prints_one_line_on_a_version_error(tmp_path, token_npz):
    """A forced old DeepSpeed (here: a stand-in package without what star-scale needs) ends in one line, exit 2."""
    fake = tmp_path / "site"
    (fake / "deepspeed").mkdir(parents=True)
    (fake / "deepspeed" / "__init__.py").write_text("")
    dist = fake / "deepspeed-0.14.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: deepspeed\nVersion: 0.14.0\n")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from star_scale.cli import main; "
            "sys.exit(main(['train', 'recipes/tiny-ar.yaml', *sys.argv[2:]]))")
    args = [*TINY, f"data.path={token_npz}", "data.global_batch=16", "tracking.enabled=false",
            f"train.out_dir={tmp_path / 'run'}"]
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}  # rank 0 of 2: the DeepSpeed engine
    out = subprocess.run([sys.executable, "-c", code, str(fake), *args], capture_output=True, text=True, cwd=ROOT,
                         env=env)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert re.search(r"star-scale: error: deepspeed 0.14.0: star-scale needs deepspeed.initialize, which this version "
                     r"lacks; tested with deepspeed>=0.19,<0.20", out.stderr), out.stderr[-2000:]
