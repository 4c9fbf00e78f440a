"""Sphinx configuration of electfsm's documentation (``make docs``).

Built with ``-W -n``: every warning is an error and every cross-reference must resolve.

Offline by design: intersphinx is OFF (no inventory is fetched or shipped). The names from
other libraries that appear in electfsm's signatures (the standard library, transitions,
anyio) are listed below in ``nitpick_ignore_regex``, one library at a time; electfsm's own
names are never ignored, so an undocumented electfsm type in a public signature fails the
build.
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

html_theme = "furo"
html_title = "electfsm"
html_static_path: list[str] = []

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autoclass_content = "both"
# long signatures (Elector has a dozen keyword arguments) one parameter a line
python_maximum_signature_line_length = 88

nitpicky = True

# Names from other libraries that appear in electfsm's signatures, by library; each pattern is
# anchored to that library's package. (grpc, attrs and prometheus-client types never reach a
# public signature: they are typed Any there.)
nitpick_ignore_regex = [
    # the standard library
    (r"py:class", r"(collections\.abc|os|pathlib|threading|ssl|logging)\..*"),
    # transitions: build_machine returns its Machine
    (r"py:class", r"transitions\..*"),
    # anyio: electfsm.aio is built on it
    (r"py:(mod|class)", r"anyio(\..*)?"),
]

# Hook and work types are aliases written as strings (their targets are imported only for
# type checking); render them by name, linked to their entries in reference/electfsm.rst.
autodoc_type_aliases = {
    name: f"electfsm.hooks.{name}"
    for name in ("Work", "LeaderHook", "ChangeHook", "LeaderChangeHook", "ErrorHook")
} | {"AsyncWork": "electfsm.aio.elector.AsyncWork"}
