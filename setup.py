"""Build of espswitch's one compiled module, the fast path (issue 10).

Everything else is in pyproject.toml. The extension is optional: without a C compiler,
Python headers, OpenSSL headers or Cython the package still installs and runs, on the
pure-Python datapath (`espswitch.datapath.fast.AVAILABLE` is then False).

Environment:
  ESPSWITCH_NO_FASTPATH=1   do not build the module at all
  ESPSWITCH_SANITIZE=1      build it with -fsanitize=address,undefined (scripts/asan-fuzz.sh)
"""

from __future__ import annotations

import hashlib
import os

from setuptools import setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """Build the fast path when possible; warn and go on without it otherwise."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # any failure leaves the pure-Python path
            self.warn(f"espswitch fast path not built ({exc}); the Python datapath is used")

    def build_extension(self, ext) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # idem
            self.warn(f"espswitch fast path not built ({exc}); the Python datapath is used")


def _extensions() -> list:
    if os.environ.get("ESPSWITCH_NO_FASTPATH"):
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        print("espswitch: Cython not found, the fast path is not built")
        return []
    from setuptools import Extension

    cflags = ["-O2", "-Wall", "-Wno-unused-function"]
    ldflags: list[str] = []
    if os.environ.get("ESPSWITCH_SANITIZE"):
        san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
               "-fno-omit-frame-pointer", "-g", "-O1"]
        cflags += san
        ldflags += san
    pyx = "src/espswitch/datapath/fast/_fastpath.pyx"
    # The module carries the hash of the source it was built from: the package refuses a
    # build older than its .pyx (see espswitch/datapath/fast/__init__.py).
    with open(pyx, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    ext = Extension(
        "espswitch.datapath.fast._fastpath",
        [pyx],
        define_macros=[("ESP_SOURCE_SHA256", f'"{digest}"')],
        libraries=["crypto", "z"],
        extra_compile_args=cflags,
        extra_link_args=ldflags,
        optional=True,
    )
    try:
        return cythonize([ext], language_level=3, quiet=True)
    except Exception as exc:  # a Cython error must not stop the install
        print(f"espswitch: the fast path did not compile ({exc}); it is not built")
        return []


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
