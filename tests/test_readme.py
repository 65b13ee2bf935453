"""Every number in the README is generated (docs/readme.py) from the code or committed data;
this fails when the README differs from what the code prints now (issue 9, item 7)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_matches_what_the_code_prints():
    result = subprocess.run([sys.executable, str(ROOT / "docs" / "readme.py"), "--check"], capture_output=True,
                            text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_the_check_notices_a_changed_number(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "docs"))
    import readme

    text = readme.README.read_text()
    marker = "<!-- begin: seed-states -->\n"
    stale = text.replace(marker, marker + "the seed notes (112 / 38 GB)\n", 1)
    # the README itself is current (test_readme_matches_what_the_code_prints): regenerate only the
    # changed section, the others stand in with what the README holds
    current = {m["name"]: m["body"] for m in readme.MARKER.finditer(text)}
    sections = {name: (lambda body=current[name]: body) for name in readme.SECTIONS}
    sections["seed-states"] = readme.SECTIONS["seed-states"]
    monkeypatch.setattr(readme, "SECTIONS", sections)
    assert readme.generate(stale) == text != stale
