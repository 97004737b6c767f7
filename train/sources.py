"""The training data's packages: what they are, their licences, and how to fetch them offline-safe.

Every source is a package from a registry these machines reach (Debian's apt, npm). They are
fetched once into a cache folder, checked against the sha256 recorded here, and unpacked
there; nothing is downloaded at run time of the service.
"""
from __future__ import annotations

import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.model import file_sha256

CACHE = Path.home() / ".cache" / "interneg-train"


@dataclass(frozen=True)
class Source:
    name: str
    registry: str  # "apt" | "npm"
    package: str
    version: str
    sha256: str
    licence: str
    licence_note: str
    images: str  # glob of its images inside the unpacked package

    @property
    def archive(self) -> str:
        if self.registry == "apt":
            return f"{self.package}_{self.version}_all.deb"
        return f"{self.package.lstrip('@').replace('/', '-')}-{self.version}.tgz"


SOURCES = {
    "tuxpaint": Source(
        "tuxpaint", "apt", "tuxpaint-stamps-default", "2022.06.04-1",
        "6db6c1bfc870a47f1499d6203b083522eacb57c5f9c87d468f2e92eb6d9d5f34", "GPL-2.0-or-later",
        "Tux Paint stamps, (c) 2002-2022 Bill Kendrick and contributors (debian/copyright of the package)",
        "usr/share/tuxpaint/stamps/**/*.png",
    ),
    "noto": Source(
        "noto", "npm", "emoji-datasource-google", "16.0.0",
        "fb5fd131b362aab7a55542d2a147a79708cce0a8b1c1bbacd470172708b5c438", "Apache-2.0",
        "Noto Emoji images by Google (github.com/googlefonts/noto-emoji), packaged by iamcal/emoji-data (MIT)",
        "package/img/google/64/*.png",
    ),
    "twemoji": Source(
        "twemoji", "npm", "emoji-datasource-twitter", "16.0.0",
        "f64a530c63bca463bd8317fdc4615ce63a53a0c65018e4ce2d848aaba7a28877", "CC-BY-4.0",
        "Twemoji graphics (c) Twitter, Inc. and other contributors, CC-BY 4.0 (github.com/jdecked/twemoji), "
        "packaged by iamcal/emoji-data (MIT)",
        "package/img/twitter/64/*.png",
    ),
}


def fetch(source: Source, cache: Path = CACHE) -> Path:
    """The unpacked package folder, fetched and unpacked on first use."""
    cache.mkdir(parents=True, exist_ok=True)
    archive = cache / source.archive
    if not archive.is_file():
        if source.registry == "apt":
            subprocess.run(["apt-get", "download", f"{source.package}={source.version}"], cwd=cache, check=True)
        else:
            subprocess.run(["npm", "pack", "--silent", f"{source.package}@{source.version}"], cwd=cache, check=True,
                           stdout=subprocess.DEVNULL)
    if source.sha256 and file_sha256(archive) != source.sha256:
        raise RuntimeError(f"{archive}: sha256 differs from the one recorded in train/sources.py")
    folder = cache / source.name
    if not (folder / ".unpacked").is_file():
        folder.mkdir(exist_ok=True)
        if source.registry == "apt":
            subprocess.run(["dpkg-deb", "-x", str(archive), str(folder)], check=True)
        else:
            with tarfile.open(archive) as tar:
                tar.extractall(folder, filter="data")
        (folder / ".unpacked").touch()
    return folder
