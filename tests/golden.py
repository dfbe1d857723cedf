"""Inline golden text: `check_golden("key", actual, '''expected''')`.

With FLAGC_ACCEPT=1 a mismatch rewrites the expected literal in the calling test file (found by
its key) instead of failing, so a deliberate IR change is one command and a reviewed diff.
"""

from __future__ import annotations

import inspect
import os
import re
import textwrap


def check_golden(key: str, actual: str, expected: str) -> None:
    want = textwrap.dedent(expected).strip("\n")
    got = actual.strip("\n")
    if got == want:
        return
    if os.environ.get("FLAGC_ACCEPT") == "1":
        _rewrite(inspect.stack()[1].filename, key, got)
        return
    raise AssertionError(f"golden text {key!r} differs (FLAGC_ACCEPT=1 to accept):\n"
                         f"--- expected\n{want}\n--- actual\n{got}")


def _rewrite(path: str, key: str, text: str) -> None:
    with open(path) as f:
        source = f.read()
    call = re.search(r'check_golden\(\s*"' + re.escape(key) + r'"', source)
    if call is None:
        raise AssertionError(f"cannot find check_golden({key!r}, ...) in {path}")
    start = source.index('"""', call.end())
    end = source.index('"""', start + 3)
    indent = " " * 8
    body = "\n" + textwrap.indent(text, indent) + "\n" + indent[:-4]
    with open(path, "w") as f:
        f.write(source[:start + 3] + body + source[end:])
