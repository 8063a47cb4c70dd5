"""Build plots/offline.html: the page template `dvc plots show` fills, with Vega inlined.

DVC's own page loads vega, vega-lite and vega-embed from a CDN, so on a machine without internet
its plots page is blank. This template holds the same versions (the ones dvc-render asks for)
inside the page, and .dvc/config points `plots.html_template` at it. Rebuild it after a dvc-render
upgrade changes those versions:

    cd "$(mktemp -d)" && npm pack vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2
    python scripts/offline_plots_template.py THAT_FOLDER

Vega, Vega-Lite and Vega-Embed are BSD-3-Clause licensed (University of Washington Interactive
Data Lab); their licence texts are copied into the page beside their code.
"""

from __future__ import annotations

import sys
import tarfile
from pathlib import Path

PACKAGES = (("vega", "5.20.2", "build/vega.min.js"), ("vega-lite", "5.2.0", "build/vega-lite.min.js"),
            ("vega-embed", "6.18.2", "build/vega-embed.min.js"))
OUT = Path(__file__).resolve().parent.parent / "plots" / "offline.html"
PAGE = """<!DOCTYPE html>
<html>
<head>
    {{refresh_tag}}
    <title>DVC Plot</title>
    <!-- {note} -->
{scripts}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def read_member(tarball: Path, name: str) -> str:
    with tarfile.open(tarball) as archive:
        return archive.extractfile(f"package/{name}").read().decode("utf-8")


def main(folder: str) -> None:
    scripts, licences = [], {}
    for package, version, script in PACKAGES:
        tarball = Path(folder) / f"{package}-{version}.tgz"
        code, licence = read_member(tarball, script), read_member(tarball, "LICENSE")
        if "</script" in code or "{plot_divs}" in code:
            sys.exit(f"{tarball}: its code would end the script element or fill a placeholder; inline it another way")
        notice, terms = licence.split("\n", 1)  # "Copyright (c) <years>, <holder>", then the BSD-3 terms
        licences.setdefault(terms.strip(), []).append(f"{package} {version}: {notice.strip()}")
        scripts.append(f"    <!-- {package} {version} -->\n    <script>{code}</script>")
    for terms, notices in licences.items():  # the three share the terms: copied once, under each notice
        text = "\n".join(notices) + "\n\n" + terms
        scripts.insert(0, f"    <!--\n{text.replace('--', '- -')}\n    -->")
    note = ("built by scripts/offline_plots_template.py: vega, vega-lite and vega-embed inlined, so the page "
            "works offline")
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(PAGE.format(note=note, scripts="\n".join(scripts)))
    print(f"wrote {OUT} ({OUT.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
