"""Output paths given on the command line (--save, --plot, --json, --markdown), checked before any training or
measuring, so that a typo costs seconds rather than a finished run: each file is written to exactly the path given
(no suffix added), into a directory that must already exist."""
import os

__all__ = ["check_output_path", "temporary_beside"]


def check_output_path(path, option):
    """Return path (a str) after checking that a file can be written there: not empty, not a directory, its directory
    exists and is writable, an existing file there is writable. Otherwise ValueError naming the option and path."""
    if path is None:
        return None
    path = os.fspath(path)
    if not isinstance(path, str) or not path:
        raise ValueError(f"{option} needs a file path, got {path!r}")
    where = f"{option} {path}"
    if os.path.isdir(path) or path.endswith(os.sep) or (os.altsep and path.endswith(os.altsep)):
        raise ValueError(f"{where}: is a directory; give a file name inside it, e.g. "
                         f"{os.path.join(path, 'out')}")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        kind = "is not a directory" if os.path.exists(directory) else "does not exist"
        raise ValueError(f"{where}: the folder {directory} {kind}")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ValueError(f"{where}: the folder {directory} is not writable")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise ValueError(f"{where}: the existing file is not writable")
    limit = _name_max(directory)
    if len(os.fsencode(os.path.basename(path))) > limit:
        raise ValueError(f"{where}: the file name is longer than the {limit} bytes this file system allows")
    return path


def _name_max(directory):
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (AttributeError, ValueError, OSError):
        return 255


def temporary_beside(path, suffix=".tmp"):
    """(fd, name) of a new temporary file in path's directory, for writing path atomically (write, then
    os.replace). Its name starts with '.', then at most 64 bytes of path's name, so that it fits the file system's
    name limit whenever path's own name does."""
    import tempfile
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    stem = os.fsdecode(os.fsencode(os.path.basename(path))[:64])
    return tempfile.mkstemp(prefix="." + stem + ".", suffix=suffix, dir=directory)
