"""Build the writer corpus into a folder and print what each writer produced and how long it took.

    cd tests && python -m writers /tmp/corpus [NAME ...]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from . import WRITERS, WriterUnavailable
from .corpus import Corpus


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    corpus = Corpus(Path(argv[0]))
    names = argv[1:] or list(WRITERS)
    t0 = time.monotonic()
    for name in names:
        try:
            w = corpus.get(name)
        except WriterUnavailable as e:
            print(f"{name:24s}      - unavailable: {e}")
            continue
        kind = "real" if w.real_library else "reconstructed"
        print(f"{name:24s} {w.build_seconds:6.2f}s {kind:13s} {w.library} {w.library_version}: "
              f"{len(w.checkpoints)} checkpoints, {len(w.all_files())} files")
    print(f"total {time.monotonic() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
