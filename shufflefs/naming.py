"""File classes by name (see docs/SEMANTICS.md).

durable  - Spark's committed map outputs: written through to the store on commit.
anything else is local: scratch files and the `<durable name>.<uuid>` temporaries Spark writes
before renaming them into place.
"""

from __future__ import annotations

import re

DURABLE_PATTERN = re.compile(r"shuffle_\d+_\d+_\d+\.(?:data|index|checksum\.\w+)")
INDEX_SUFFIX = ".index"
#: .index files up to this size are kept in the LMDB index cache
INDEX_CACHE_MAX = 1024 * 1024


#: a name no other creator can pick: Spark's own local dirs are `spark-<uuid>`, `blockmgr-<uuid>`,
#: `executor-<uuid>`
UNIQUE_PATTERN = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def is_unique(name: str) -> bool:
    """Whether a directory of this name can only have been created by one creator."""
    return UNIQUE_PATTERN.search(name) is not None


def is_block_manager_dir(name: str) -> bool:
    """Whether a directory of this name is one of Spark's block managers (`blockmgr-<uuid>`, one
    per executor and local dir), where its map outputs are."""
    return name.startswith("blockmgr-") and is_unique(name)


def is_checksum(name: str) -> bool:
    return ".checksum." in name and is_durable(name)


def is_durable(name: str) -> bool:
    return DURABLE_PATTERN.fullmatch(name) is not None


def checksum_companion(name: str) -> str:
    """The side file Hadoop's local file system writes beside every file it writes (Spark's
    fallback copies), holding CRCs of its bytes. It stays local (see docs/RECOVERY.md), and
    goes when its file is found deleted."""
    return f".{name}.crc"


def is_index(name: str) -> bool:
    return name.endswith(INDEX_SUFFIX)
