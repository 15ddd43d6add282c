"""Hash of the C++/CUDA sources, compiled into noisekernels._C and re-checked at import."""

import hashlib
import os

_SOURCE_SUFFIXES = (".h", ".cuh", ".cpp", ".cu")


def source_hash(csrc_dir: str) -> str:
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(csrc_dir):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(_SOURCE_SUFFIXES):
                path = os.path.join(root, name)
                digest.update(os.path.relpath(path, csrc_dir).replace(os.sep, "/").encode())
                with open(path, "rb") as f:
                    digest.update(f.read())
    return digest.hexdigest()[:16]
