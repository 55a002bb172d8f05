"""Build vega/offline.html: DVC's plot page with vega, vega-lite and vega-embed inlined, so that
`dvc plots show` renders offline (DVC's own page loads them from a CDN).

The three libraries come from the npm registry as pinned tarballs, checked against npm's sha512
integrity; their licences are copied to vega/licenses/. The output is committed; re-run this
(`make plots-template`) only to change a version. Used through `.dvc/config`:
[plots] html_template = ../vega/offline.html
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import sys
import tarfile
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from pipeline.outputs import write_text  # noqa: E402

# The majors DVC's page uses (vega 5, vega-lite 5, vega-embed 6), newest releases of each.
PACKAGES = {
    "vega": ("5.33.1", "build/vega.min.js",
             "sha512-1fArfVDUqVbb5z8n+/nVQb+VNBzx8svY6CrsyTK4Ujm4yrd9I1auoKxBAPXLCavY1LcrbHUskQbGUP8gXOzyQw=="),
    "vega-lite": ("5.23.0", "build/vega-lite.min.js",
                  "sha512-l4J6+AWE3DIjvovEoHl2LdtCUkfm4zs8Xxx7INwZEAv+XVb6kR6vIN1gt3t2gN2gs/y4DYTs/RPoTeYAuEg6mA=="),
    "vega-embed": ("6.29.0", "build/vega-embed.min.js",
                   "sha512-PmlshTLtLFLgWtF/b23T1OwX53AugJ9RZ3qPE2c01VFAbgt3/GSNI/etzA/GzdrkceXFma+FDHNXUppKuM0U6Q=="),
}
REGISTRY = "https://registry.npmjs.org"
# DVC fills {plot_divs} (and {refresh_tag}); there is deliberately no {scripts}: that is where
# DVC would put its CDN <script src=...> tags.
PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
%s
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def fetch(name: str, version: str, integrity: str) -> tarfile.TarFile:
    url = f"{REGISTRY}/{name}/-/{name}-{version}.tgz"
    data = urllib.request.urlopen(url, timeout=60).read()
    algorithm, expected = integrity.split("-", 1)
    got = base64.b64encode(hashlib.new(algorithm, data).digest()).decode()
    if got != expected:
        raise SystemExit(f"{url}: {algorithm} {got} does not match the pinned {expected}")
    return tarfile.open(fileobj=io.BytesIO(data))


def licence_text(tar: tarfile.TarFile) -> str:
    """The package's LICENSE file; vega's own tarball has none (it lives at the root of its
    monorepo), so then the licence named in package.json, with where to read its full text."""
    names = [m for m in tar.getnames() if m.count("/") == 1 and m.split("/")[1].upper().startswith("LICEN")]
    if names:
        return tar.extractfile(names[0]).read().decode("utf-8")
    meta = json.loads(tar.extractfile("package/package.json").read())
    repo = meta.get("repository", {})
    repo = repo.get("url", "") if isinstance(repo, dict) else repo
    return (f"{meta['name']} {meta['version']}: licence {meta.get('license')} (package.json; the npm tarball "
            f"ships no LICENSE file). Full text: the LICENSE file at the root of {repo}.\n")


def main() -> None:
    scripts = []
    for name, (version, member, integrity) in PACKAGES.items():
        tar = fetch(name, version, integrity)
        code = tar.extractfile(f"package/{member}").read().decode("utf-8")
        for placeholder in ("{plot_divs}", "{refresh_tag}", "{scripts}"):
            assert placeholder not in code, (name, placeholder)
        code = code.replace("</script", "<\\/script")
        scripts.append(f"    <!-- {name} {version} ({REGISTRY}/{name}), licence: vega/licenses/{name}.LICENSE -->\n"
                       f"    <script>{code}</script>")
        write_text(HERE / "licenses" / f"{name}.LICENSE", licence_text(tar))
    write_text(HERE / "offline.html", PAGE % "\n".join(scripts))
    print(f"{HERE / 'offline.html'} written ({(HERE / 'offline.html').stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
