"""What the node image installs: ``requirements.txt`` without the test dependencies, every line pinned.

    python infra/image_requirements.py requirements.txt > /tmp/image-requirements.txt   (infra/Dockerfile)

- Test-only packages (``TEST_ONLY``: moto, pytest, pytest-timeout) are dropped: a node runs stages,
  never the test suite.
- ``requirements.txt`` leaves a few small packages unpinned; the image pins them (``PINS``) to the
  versions the test suite runs with (``tests/test_cluster_files.py`` checks that ``PINS`` matches the
  project's environment and that every line written here is ``name==version``), so a node boot
  never resolves a newer release than the one tested.
- Exits 1 naming the line when a requirement is neither pinned nor in ``PINS``.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

TEST_ONLY = {"moto", "pytest", "pytest-timeout"}
PINS = {"rich": "15.0.0", "pyyaml": "6.0.4", "psutil": "7.2.2"}
_NAME = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*(.*)$")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def image_requirements(text: str) -> list[str]:
    """The requirement lines of ``text`` for the image (comments stripped, test deps out, all pinned)."""
    out = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _NAME.match(line)
        if not m:
            raise ValueError(f"cannot parse requirement line {raw!r}")
        name, extras, spec = m.group(1), m.group(2) or "", m.group(3).strip()
        key = normalize(name)
        if key in TEST_ONLY:
            continue
        if not spec:
            if key not in PINS:
                raise ValueError(f"requirement {name!r} is not pinned and has no image pin in PINS")
            spec = f"=={PINS[key]}"
        if not re.fullmatch(r"==\s*[A-Za-z0-9.+!-]+", spec):
            raise ValueError(f"requirement {line!r} is not pinned with == (the image installs exact versions)")
        out.append(f"{name}{extras}{spec.replace(' ', '')}")
    return out


def main(argv: list[str]) -> int:
    path = Path(argv[1] if len(argv) > 1 else "requirements.txt")
    try:
        lines = image_requirements(path.read_text())
    except ValueError as e:
        print(f"image_requirements: {path}: {e}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
