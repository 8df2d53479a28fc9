"""Real photographs that installable packages ship, found on disk: the source material of ``imagenet-like``.

Nothing is downloaded: each :class:`Photo` is a file inside a wheel (scikit-image's ``skimage/data``,
matplotlib's ``mpl-data/sample_data``), found through the import system without importing the
package (importing scikit-image takes a second; locating it takes microseconds). Only files inside
the wheels are listed: scikit-image fetches its other images with pooch at run time, which is
exactly what this dataset must not need. The same 15 files are in every scikit-image wheel from
0.19 to 0.26 and every matplotlib 3.x.

The catalogue was chosen by looking at every image those wheels ship: scenes a camera took
(a person, a cat, a cup, a motorcycle, a launch pad, a portrait), a few scientific photographs
(a retina, a stained tissue, the Hubble deep field) and grey photographs of textures and objects.
Left out: drawings, renderings, colour charts, text pages and images of a few dozen pixels, which
do not compress like photographs; a stereo pair counts once (its halves are the same scene).
matplotlib ships one photograph only (grace_hopper.jpg), so it cannot be the only source.
scikit-learn ships two more (china.jpg, flower.jpg) but costs 9 MB and two more packages for
them. The catalogue is all or nothing, so the images are the same on every machine that has the
``imagenet-like`` extra: an optional photo would change every image where it is installed.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

__all__ = ["CATALOGUE", "DISTRIBUTIONS", "Photo", "find_photos", "photos_fingerprint"]


@dataclass(frozen=True)
class Photo:
    module: str  # import name of the package that ships it
    path: str  # inside the package's folder
    weight: float  # relative frequency in the dataset: scenes like ImageNet's count most
    # Per-channel gains for a grey photograph: ImageNet is almost all colour, and a tinted texture
    # (green grass, red brick) has chroma that varies with its luminance, like a colour photograph's.
    tint: tuple[float, float, float] | None = None

    @property
    def name(self) -> str:
        return f"{self.module}/{self.path}"


_SKIMAGE = "skimage"
_MATPLOTLIB = "matplotlib"

# What to pip install for each package's photos.
DISTRIBUTIONS = {_SKIMAGE: "scikit-image", _MATPLOTLIB: "matplotlib"}

# Order matters (the generator indexes it): a change here changes the images, so it needs a new
# imagenet_like._VERSION.
CATALOGUE: tuple[Photo, ...] = (
    # scikit-image (pip install scikit-image): 14 photographs in the wheel
    Photo(_SKIMAGE, "data/astronaut.png", 1.0),  # 512x512 portrait in a space suit
    Photo(_SKIMAGE, "data/chelsea.png", 1.0),  # 451x300 cat
    Photo(_SKIMAGE, "data/coffee.png", 1.0),  # 600x400 cup on a table
    Photo(_SKIMAGE, "data/motorcycle_left.png", 1.0),  # 741x500 motorcycle in a workshop
    Photo(_SKIMAGE, "data/rocket.jpg", 1.0),  # 640x427 launch pad at night
    Photo(_SKIMAGE, "data/hubble_deep_field.jpg", 0.5),  # 1000x872 galaxies
    Photo(_SKIMAGE, "data/ihc.png", 0.5),  # 512x512 stained tissue, microscope
    Photo(_SKIMAGE, "data/retina.jpg", 0.5),  # 1411x1411 eye fundus
    Photo(_SKIMAGE, "data/camera.png", 0.5),  # 512x512 grey, cameraman in a field
    Photo(_SKIMAGE, "data/brick.png", 0.5, (1.12, 0.9, 0.78)),  # 512x512 grey brick wall
    Photo(_SKIMAGE, "data/grass.png", 0.5, (0.8, 1.05, 0.6)),  # 512x512 grey grass
    Photo(_SKIMAGE, "data/gravel.png", 0.5, (1.05, 1.0, 0.88)),  # 512x512 grey gravel
    Photo(_SKIMAGE, "data/coins.png", 0.3),  # 384x303 grey coins
    Photo(_SKIMAGE, "data/moon.png", 0.3),  # 512x512 grey lunar surface
    # matplotlib (pip install matplotlib)
    Photo(_MATPLOTLIB, "mpl-data/sample_data/grace_hopper.jpg", 1.0),  # 512x600 portrait
)


def _package_dir(module: str) -> Path | None:
    """The folder of an installed top-level package, without importing it; None when it is not installed."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def find_photos(catalogue: tuple[Photo, ...] | None = None) -> list[tuple[Photo, Path]]:
    """The photos of ``catalogue`` (default :data:`CATALOGUE`) on this machine, in its order, with their files."""
    found: list[tuple[Photo, Path]] = []
    folders: dict[str, Path | None] = {}
    for photo in CATALOGUE if catalogue is None else catalogue:
        if photo.module not in folders:
            folders[photo.module] = _package_dir(photo.module)
        folder = folders[photo.module]
        if folder is not None and (folder / photo.path).is_file():
            found.append((photo, folder / photo.path))
    return found


def photos_fingerprint(photos: list[tuple[Photo, Path]]) -> str:
    """A hex digest of the photos' names, treatments and bytes: what the generated images depend on."""
    return _fingerprint(tuple((photo, str(path)) for photo, path in photos))


@lru_cache(maxsize=4)
def _fingerprint(photos: tuple[tuple[Photo, str], ...]) -> str:
    digest = hashlib.sha256()
    for photo, path in photos:
        digest.update(repr((photo.name, photo.weight, photo.tint)).encode())
        digest.update(hashlib.sha256(Path(path).read_bytes()).digest())
    return digest.hexdigest()
