"""Sphinx configuration of electfsm's documentation (``make docs``).

Built with ``-W -n``: every warning is an error and every cross-reference must resolve.

Offline by design: intersphinx is OFF, nothing is fetched at build time. References to names
outside electfsm (the standard library, attrs, grpc, anyio, transitions, prometheus-client)
that appear in signatures are listed below in ``nitpick_ignore`` / ``nitpick_ignore_regex``,
one library at a time; electfsm's own names are never ignored, so an undocumented electfsm
type in a public signature fails the build.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))
sys.path.insert(0, str(HERE.parent))

project = "electfsm"
author = "the electfsm authors"
copyright = "2026, the electfsm authors"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "electfsm_docs",  # docs/_ext: the transition table and the CLI reference, generated
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
root_doc = "index"

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3
# the diagram is included from diagrams/ (one file, made by make diagrams): no copy in docs/
myst_fence_as_directive: list[str] = []

html_theme = "furo"
html_title = "electfsm"
html_static_path: list[str] = []

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autoclass_content = "both"

nitpicky = True

# Names from other libraries, by library. Each pattern is anchored to that library's package.
nitpick_ignore_regex = [
    # the standard library
    (r"py:.*", r"(threading|socket|ssl|os|pathlib|subprocess|collections\.abc|typing|types|"
               r"http\.server|logging|argparse|queue|enum|contextlib|concurrent\.futures|"
               r"datetime|io|signal)\..*"),
    (r"py:class", r"(Path|Event|Thread|SSLContext|Popen|socket|TracebackType|"
                  r"BaseHTTPRequestHandler|ThreadingHTTPServer|PathLike)"),
    # attrs
    (r"py:.*", r"attr(s)?\..*"),
    # grpc and the protobuf stubs of python3-etcd3
    (r"py:.*", r"(grpc|etcd3|google\.protobuf)\..*"),
    # anyio (electfsm.aio)
    (r"py:.*", r"anyio(\..*)?"),
    # transitions (the machine)
    (r"py:.*", r"transitions\..*"),
    # prometheus_client (electfsm.metrics)
    (r"py:.*", r"prometheus_client\..*"),
]
nitpick_ignore = [
    # typing's type variables render bare in signatures
    ("py:class", "T"),
]

# Hook and work types are aliases written as strings (their targets are imported only for
# type checking); render them by name, linked to their entries in reference/electfsm.rst.
autodoc_type_aliases = {
    name: f"electfsm.hooks.{name}"
    for name in ("Work", "LeaderHook", "ChangeHook", "LeaderChangeHook", "ErrorHook")
} | {"AsyncWork": "electfsm.aio.elector.AsyncWork"}
