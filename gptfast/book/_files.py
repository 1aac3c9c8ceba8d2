"""Where the book's download functions get their files: a local file or folder, or the book's URL."""

from __future__ import annotations

import os
import shutil
import urllib.error
import urllib.parse
import urllib.request


class DownloadError(RuntimeError):
    """A file the book downloads could not be fetched; the message names the file to place and where."""


def _local_source(source, name):
    """``source`` as a local file, or ``name`` inside a local folder ``source``; None for a URL."""
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if source.startswith("file://"):
        source = urllib.request.url2pathname(urllib.parse.urlparse(source).path)
    if os.path.isdir(source):
        path = os.path.join(source, name)
        if not os.path.isfile(path):
            raise DownloadError(f"{name} is not in the folder {source}: place it there, or pass the file itself")
        return path
    if os.path.isfile(source):
        return source
    if "://" not in source:
        raise DownloadError(f"{source} is neither a file, a folder nor a URL: pass the book's URL or a local copy")
    return None


def fetch(source, destination, backup_url=None):
    """Bring ``source`` (the book's URL, a local file, or a folder holding the file) to ``destination``.

    A URL is read with ``urllib`` (and ``backup_url`` when it fails); offline this raises one line
    naming the file to place and where."""
    destination = os.fspath(destination)
    name = os.path.basename(destination)
    local = _local_source(source, name)  # a folder must hold the file under the name it is saved as
    folder = os.path.dirname(os.path.abspath(destination))
    os.makedirs(folder, exist_ok=True)
    if local is not None:
        if os.path.abspath(local) != os.path.abspath(destination):
            shutil.copyfile(local, destination)
        return destination
    errors = []
    for url in [source] + ([backup_url] if backup_url else []):
        try:
            with urllib.request.urlopen(url) as response:
                data = response.read()
        except (urllib.error.URLError, OSError) as e:  # HTTPError is a URLError
            errors.append(f"{url}: {getattr(e, 'reason', e)}")
            continue
        tmp = destination + ".part"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, destination)
        return destination
    raise DownloadError(f"could not download {name} ({'; '.join(errors)}): place the file at {destination} "
                        f"(or pass its local path instead of the URL) and run again")
