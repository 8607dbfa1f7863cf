"""setup.py lists its packages by hand (kernels/ installs as vse_fast.kernels): a new subpackage
missing from the list would be left out of the wheel silently."""
import ast
import os

from setuptools import find_packages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup_keyword(name):
    tree = ast.parse(open(os.path.join(ROOT, "setup.py"), encoding="utf-8").read())
    call = next(node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup")
    return ast.literal_eval(next(k.value for k in call.keywords if k.arg == name))


def test_setup_lists_every_package_of_the_source_tree():
    found = {"vse_fast"} | {f"vse_fast.{p}" for p in find_packages(os.path.join(ROOT, "vse_fast"))}
    found |= {"vse_fast.kernels"} | {f"vse_fast.kernels.{p}" for p in find_packages(os.path.join(ROOT, "kernels"))}
    assert set(_setup_keyword("packages")) == found
    assert _setup_keyword("package_dir") == {"vse_fast": "vse_fast", "vse_fast.kernels": "kernels"}


def test_the_triton_floor_of_setup_is_the_one_the_kernels_check_at_run_time():
    """setup.py's `triton>=` and vse_fast.kernels.MIN_TRITON (an older triton found at run time is
    refused) name the same release."""
    import re

    import vse_fast.kernels

    source = open(os.path.join(ROOT, "setup.py"), encoding="utf-8").read()
    floor = re.search(r'TRITON = "triton>=(\d+)\.(\d+);', source)
    assert floor and tuple(map(int, floor.groups())) == vse_fast.kernels.MIN_TRITON
