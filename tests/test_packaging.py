"""setup.cfg lists every package, and mpiserve.kernels comes from kernels/."""

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def listed_packages() -> set[str]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    return set(config["options"]["packages"].split())


def test_every_package_directory_is_listed():
    found = {".".join(p.parent.relative_to(ROOT).parts)
             for p in (ROOT / "mpiserve").rglob("__init__.py")}
    assert (ROOT / "kernels" / "__init__.py").is_file()
    assert listed_packages() == found | {"mpiserve.kernels"}


def test_kernels_is_never_a_top_level_module():
    import mpiserve.kernels
    assert Path(mpiserve.kernels.__file__).parent.name == "kernels"
    assert mpiserve.kernels.__name__ == "mpiserve.kernels"


def test_run_help_shows_every_default():
    """Each `mpiserve run` option that has a default says it in --help."""
    from mpiserve.cli import build_parser
    run = build_parser()._subparsers._group_actions[0].choices["run"]
    text = " ".join(run.format_help().split())
    for action in run._actions:
        if action.option_strings and action.default not in (None, False, "==SUPPRESS=="):
            shown = f"default: {action.default}" in text or "default:" in (action.help or "")
            assert shown, action.option_strings


def test_an_uninstalled_copy_of_the_checkout_finds_its_own_kernels(tmp_path):
    """A copy of the source tree (as a GPU machine receives it) imports mpiserve.kernels from
    its own kernels/, not from wherever mpiserve is installed."""
    for name in ("mpiserve", "kernels"):
        shutil.copytree(ROOT / name, tmp_path / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    probe = ("import mpiserve.kernels, mpiserve.bench.gpu_check; "
             "print(mpiserve.kernels.__file__)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == tmp_path / "kernels" / "__init__.py"
