"""Builds generate the gRPC modules from server/generation.proto (they are never committed)."""

import importlib.util
import os

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithProto(build_py):
    def run(self):
        # Loaded by path: an installed `server` package elsewhere must not shadow this one.
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "server", "_codegen.py")
        spec = importlib.util.spec_from_file_location("_jaxserve_codegen", path)
        codegen = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(codegen)
        codegen.ensure_generated()
        super().run()


setup(cmdclass={"build_py": BuildPyWithProto})
