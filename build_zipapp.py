#!/usr/bin/env python3
"""Build dist/satellite.pyz and dist/satellite-client.pyz: single-file, stdlib-only apps.

Reproducible: the same sources give the same bytes (entries sorted, fixed timestamps
and modes), so an admin can rebuild and compare before trusting a copy.

    python3 build_zipapp.py [--output-dir dist]

Each archive holds the program's source, readable as is (unzip -p dist/satellite.pyz
satellite.py), and a three-line __main__.py that runs it. satellite-client.pyz carries
satellite.py as well, byte for byte: the job's agent speaks the tunnel protocol, whose one
copy is satellite.py's (satellite_client.py imports it from there).
"""
import argparse
import io
import os
import sys
import zipapp
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
# archive -> (the module its __main__ runs, the modules it carries)
APPS = {"satellite.pyz": ("satellite", ["satellite"]),
        "satellite-client.pyz": ("satellite_client", ["satellite_client", "satellite"])}
INTERPRETER = "/usr/bin/env python3"
FIXED_TIME = (1980, 1, 1, 0, 0, 0)          # zip's earliest date: no build time in the archive
LAUNCHER = "import sys\nimport {module}\nsys.exit({module}.main())\n"


def archive_bytes(main: str, modules: list) -> io.BytesIO:
    files = {"__main__.py": LAUNCHER.format(module=main).encode()}
    files.update({f"{module}.py": (ROOT / f"{module}.py").read_bytes() for module in modules})
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in sorted(files):
            info = zipfile.ZipInfo(name, FIXED_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, files[name])
    buffer.seek(0)
    return buffer


def build(output_dir: Path) -> list:
    output_dir.mkdir(parents=True, exist_ok=True)
    built = []
    for name, (main, modules) in APPS.items():
        target = output_dir / name
        zipapp.create_archive(archive_bytes(main, modules), target, interpreter=INTERPRETER)
        os.chmod(target, 0o755)                 # run as ./dist/satellite.pyz, whatever the umask
        built.append(target)
    return built


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default=str(ROOT / "dist"), help="where to write the .pyz files")
    args = parser.parse_args(argv)
    for target in build(Path(args.output_dir)):
        print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
