"""Other HDFS clients (pyarrow's `hdfs`, secure WebHDFS): renames are atomic; no checksum we can compare."""

from __future__ import annotations

from auditor.backends.base import Backend


class HDFSBackend(Backend):
    """HDFS reached other than through our checked WebHDFS: only its atomic rename is relied on."""

    protocols = ("hdfs", "arrow_hdfs", "swebhdfs")
    renames_atomically = True
