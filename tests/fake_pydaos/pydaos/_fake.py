"""The fake DAOS "engine" behind tests/fake_pydaos/pydaos: the shim calls, backed by SQLite.

Only tests use this. The shim-like functions return DER codes the way pydaos_shim.c does
(0 or a negative DER_*); the admin functions at the end stand in for `dmg`/`daos` commands
and for fault injection.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import uuid
import zlib

DER_SUCCESS = 0
PYDAOS_DICT, PYDAOS_ARRAY = 0, 1

# DER_* numbers as in daos_errno.h (GURT errors from 1000, DAOS errors from 2000)
_GURT = [
    "NO_PERM",
    "NO_HDL",
    "INVAL",
    "EXIST",
    "NONEXIST",
    "UNREACH",
    "NOSPACE",
    "ALREADY",
    "NOMEM",
    "NOSYS",
    "TIMEDOUT",
    "BUSY",
    "AGAIN",
    "PROTO",
    "UNINIT",
    "TRUNC",
    "OVERFLOW",
    "CANCELED",
    "OOG",
    "HG",
    "UNREG",
    "ADDRSTR_GEN",
    "PMIX",
    "IVCB_FORWARD",
    "MISC",
    "BADPATH",
    "NOTDIR",
    "CORPC_INCOMPLETE",
    "NO_RAS_RANK",
    "NOTATTACH",
    "MISMATCH",
    "EXCLUDED",
    "NOREPLY",
    "DOS",
    "BAD_TARGET",
    "GRPVER",
    "HLC_SYNC",
    "NO_SHMEM",
    "ADD_METRIC_FAILED",
    "DURATION_MISMATCH",
    "OP_NOT_PERMITTED",
    "EXCEEDS_PATH_LEN",
    "METRIC_NOT_FOUND",
    "SHMEM_PERMS",
    "HG_FATAL",
]
_DAOS = [
    "IO",
    "FREE_MEM",
    "ENOENT",
    "NOTYPE",
    "NOSCHEMA",
    "NOLOCAL",
    "STALE",
    "NOTLEADER",
    "TGT_CREATE",
    "EP_RO",
    "EP_OLD",
    "KEY2BIG",
    "REC2BIG",
    "IO_INVAL",
    "EQ_BUSY",
    "DOMAIN",
    "SHUTDOWN",
    "INPROGRESS",
    "NOTAPPLICABLE",
    "NOTREPLICA",
    "CSUM",
    "DF_INVAL",
    "DF_INCOMPT",
    "REC_SIZE",
    "TX_RESTART",
    "DATA_LOSS",
    "OP_CANCELED",
    "TX_BUSY",
    "AGENT_INCOMPAT",
    "NEED_TX",
    "RF",
    "FETCH_AGAIN",
    "TX_UNCERTAIN",
    "AGENT_COMM",
    "ID_MISMATCH",
    "TGT_RETRY",
    "NOTSUPPORTED",
    "CONTROL_INCOMPAT",
    "NO_SERVICE",
    "TX_ID_REUSED",
    "UPDATE_AGAIN",
    "NVME_IO",
    "NO_CERT",
    "BAD_CERT",
    "VOS_PARTIAL_UPDATE",
    "CHKPT_BUSY",
    "DIV_BY_ZERO",
]
ERRORS = {
    **{f"DER_{name}": 1001 + i for i, name in enumerate(_GURT)},
    **{f"DER_{name}": 2001 + i for i, name in enumerate(_DAOS)},
}
_NAMES = {number: name for name, number in ERRORS.items()}
# the ones the shim and pydaos use by name (exported positive, like the shim's constants)
DER_NO_PERM, DER_INVAL, DER_EXIST, DER_NONEXIST, DER_NOSYS, DER_UNINIT, DER_KEY2BIG, DER_AGENT_COMM = (
    ERRORS[f"DER_{name}"]
    for name in ("NO_PERM", "INVAL", "EXIST", "NONEXIST", "NOSYS", "UNINIT", "KEY2BIG", "AGENT_COMM")
)


def err_to_str(rc: int) -> str:
    return _NAMES.get(abs(rc), "DER_UNKNOWN")


_SCHEMA = """
CREATE TABLE IF NOT EXISTS pools (uuid TEXT PRIMARY KEY, label TEXT UNIQUE);
CREATE TABLE IF NOT EXISTS conts (uuid TEXT PRIMARY KEY, pool TEXT, label TEXT, layout TEXT,
                                  denied INTEGER DEFAULT 0, UNIQUE (pool, label));
CREATE TABLE IF NOT EXISTS objects (oid INTEGER PRIMARY KEY AUTOINCREMENT, cont TEXT, name BLOB,
                                    otype INTEGER, UNIQUE (cont, name));
CREATE TABLE IF NOT EXISTS kv (oid INTEGER, h INTEGER, key BLOB, value BLOB, PRIMARY KEY (oid, h, key))
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS faults (id INTEGER PRIMARY KEY, op TEXT, rc INTEGER, remaining INTEGER,
                                   match BLOB, applied INTEGER, skip INTEGER);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER);
"""

_local = threading.local()


def _db_path() -> str | None:
    directory = os.environ.get("FAKE_PYDAOS_DIR")
    if not directory:
        return None
    path = os.path.join(directory, "daos.sqlite")
    return path if os.path.exists(path) else None


def _db() -> sqlite3.Connection:
    path = _db_path()
    conn = getattr(_local, "conn", None)
    if conn is None or _local.path != path or _local.pid != os.getpid():
        conn = sqlite3.connect(path, timeout=60, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        _local.conn, _local.path, _local.pid = conn, path, os.getpid()
    return conn


class _Transaction:
    def __enter__(self) -> sqlite3.Connection:
        self.conn = _db()
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, *_):
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")


def _count(conn: sqlite3.Connection, name: str, amount: int = 1, maximum: bool = False) -> None:
    if maximum:
        conn.execute(
            "INSERT INTO counters VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = max(value, excluded.value)",
            (name, amount),
        )
    else:
        conn.execute(
            "INSERT INTO counters VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
            (name, amount),
        )


def _fault(conn: sqlite3.Connection, op: str, key: bytes | None = None) -> tuple[int, bool]:
    """The rc of an injected failure of `op` (on `key`), consuming it, and whether the operation
    is applied before it fails (an error that arrives after the server did the work); rc 0 if none."""
    for fault_id, rc, remaining, match, applied, skip in conn.execute(
        "SELECT id, rc, remaining, match, applied, skip FROM faults WHERE op = ? ORDER BY id", (op,)
    ).fetchall():
        if match is not None and (key is None or match not in key):
            continue
        if skip:
            conn.execute("UPDATE faults SET skip = skip - 1 WHERE id = ?", (fault_id,))
            continue
        if remaining == 1:
            conn.execute("DELETE FROM faults WHERE id = ?", (fault_id,))
        elif remaining > 1:
            conn.execute("UPDATE faults SET remaining = remaining - 1 WHERE id = ?", (fault_id,))
        return rc, bool(applied)
    return 0, False


def _key_bytes(key) -> bytes:
    """A key as the shim passes it to libdaos: a C string."""
    if isinstance(key, str):
        raw = key.encode()
    elif isinstance(key, bytes):
        raw = key
    else:
        raise TypeError(f"expected bytes, {type(key).__name__} found")
    return raw.split(b"\0", 1)[0]


def _value_bytes(value) -> bytes:
    if value is None:
        return b""
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bytes):
        return value
    raise TypeError(f"expected bytes, {type(value).__name__} found")


def _hash(key: bytes) -> int:
    return zlib.crc32(key)


# -- the shim --------------------------------------------------------------------------------


_initialized = False


def daos_init() -> int:
    global _initialized
    _initialized = _db_path() is not None
    return DER_SUCCESS if _initialized else -DER_AGENT_COMM


def _find(conn, table: str, ident: str, pool: str | None = None):
    where = "pool = ? AND " if pool is not None else ""
    args = (pool,) if pool is not None else ()
    return conn.execute(f"SELECT * FROM {table} WHERE {where}(uuid = ? OR label = ?)", (*args, ident, ident)).fetchone()


def cont_open(pool: str, cont: str):
    if not _initialized:
        return -DER_UNINIT, None
    with _Transaction() as conn:
        rc, _ = _fault(conn, "cont_open")
        if rc:
            return rc, None
        pool_row = _find(conn, "pools", pool)
        if pool_row is None:
            return -DER_NONEXIST, None
        cont_row = _find(conn, "conts", cont, pool=pool_row[0])
        if cont_row is None:
            return -DER_NONEXIST, None
        if cont_row[4]:
            return -DER_NO_PERM, None
        if cont_row[3] != "PYTHON":
            return -DER_INVAL, None
        return DER_SUCCESS, cont_row[0]


def cont_get(hdl: str, name):
    with _Transaction() as conn:
        rc, _ = _fault(conn, "cont_get")
        if rc:
            return rc, None, None
        row = conn.execute(
            "SELECT oid, otype FROM objects WHERE cont = ? AND name = ?", (hdl, _key_bytes(name))
        ).fetchone()
        if row is None:
            return -DER_NONEXIST, None, None
        return DER_SUCCESS, row[0], row[1]


def cont_newobj(hdl: str, name, otype: int):
    with _Transaction() as conn:
        rc, _ = _fault(conn, "cont_newobj")
        if rc:
            return rc, None
        try:
            cursor = conn.execute(
                "INSERT INTO objects (cont, name, otype) VALUES (?, ?, ?)", (hdl, _key_bytes(name), otype)
            )
        except sqlite3.IntegrityError:
            return -DER_EXIST, None
        return DER_SUCCESS, cursor.lastrowid


def kv_open(hdl: str, oid: int):
    return DER_SUCCESS, oid


def kv_get(oh: int, d: dict, value_size: int) -> int:
    with _Transaction() as conn:
        _count(conn, "kv_get_calls")
        for key in list(d):
            raw = _key_bytes(key)
            rc, _ = _fault(conn, "kv_get", raw)
            if rc:
                return rc
            row = conn.execute(
                "SELECT value FROM kv WHERE oid = ? AND h = ? AND key = ?", (oh, _hash(raw), raw)
            ).fetchone()
            _count(conn, "kv_get_values")
            if row is not None and len(row[0]) > value_size:
                _count(conn, "kv_get_refetches")  # DER_REC2BIG inside the shim: a second round trip
            d[key] = bytes(row[0]) if row is not None else None
    return DER_SUCCESS


def kv_put(oh: int, d: dict) -> int:
    with _Transaction() as conn:
        _count(conn, "kv_put_calls")
        for key, value in d.items():
            raw = _key_bytes(key)
            data = _value_bytes(value)
            rc, applied = _fault(conn, "kv_put", raw)
            if rc and not applied:
                return rc  # the puts before this one are done: bput is not atomic
            if not raw:
                return -DER_INVAL
            if data:
                conn.execute("INSERT OR REPLACE INTO kv VALUES (?, ?, ?, ?)", (oh, _hash(raw), raw, data))
                _count(conn, "kv_put_values")
                _count(conn, "max_value_size", len(data), maximum=True)
            else:
                conn.execute("DELETE FROM kv WHERE oid = ? AND h = ? AND key = ?", (oh, _hash(raw), raw))
                _count(conn, "kv_remove_values")
            if rc:
                return rc
    return DER_SUCCESS


def kv_iter(oh: int, entries: list, nr: int, size: int, anchor):
    """One page of keys in hash order after `anchor`: at most `nr` keys of `size` bytes in all,
    like daos_kv_list into the shim's buffer; returns (rc, next nr, next size, next anchor or
    None), growing nr and size the way the shim does."""
    with _Transaction() as conn:
        _count(conn, "kv_iter_calls")
        rc, _ = _fault(conn, "kv_iter")
        if rc:
            return rc, nr, size, None
        after = anchor or (-1, b"")
        rows = conn.execute(
            "SELECT h, key FROM kv WHERE oid = ? AND (h > ? OR (h = ? AND key > ?)) ORDER BY h, key LIMIT ?",
            (oh, after[0], after[0], after[1], nr + 1),
        ).fetchall()
    if rows and len(rows[0][1]) > size:
        size = len(rows[0][1])  # the shim's DER_KEY2BIG retry with a buffer that fits the key
    page, used = [], 0
    for h, key in rows[:nr]:
        if used + len(key) > size:
            break
        page.append((h, bytes(key)))
        used += len(key)
    entries.extend(key.decode() for _h, key in page)
    if len(page) == nr:
        nr *= 2
    elif size < 1024 * 1024 and page and size - used < used / len(page):
        size = size * 2 if size < 512 * 1024 else 1024 * 1024
    more = len(rows) > len(page)
    return DER_SUCCESS, nr, size, (page[-1] if more and page else None)


# -- administration and test hooks (not part of pydaos) -----------------------------------------


def create_system(directory: str) -> None:
    """Start the fake DAOS system whose state lives in `directory` (use with $FAKE_PYDAOS_DIR)."""
    os.makedirs(directory, exist_ok=True)
    conn = sqlite3.connect(os.path.join(directory, "daos.sqlite"), isolation_level=None)
    conn.executescript(_SCHEMA)
    conn.close()


def create_pool(label: str) -> str:
    pool_uuid = str(uuid.uuid4())
    with _Transaction() as conn:
        conn.execute("INSERT INTO pools VALUES (?, ?)", (pool_uuid, label))
    return pool_uuid


def create_container(pool: str, label: str, layout: str = "PYTHON") -> str:
    """Like `daos container create POOL LABEL --type PYTHON`."""
    cont_uuid = str(uuid.uuid4())
    with _Transaction() as conn:
        pool_row = _find(conn, "pools", pool)
        conn.execute(
            "INSERT INTO conts (uuid, pool, label, layout) VALUES (?, ?, ?, ?)", (cont_uuid, pool_row[0], label, layout)
        )
    return cont_uuid


def deny(pool: str, cont: str) -> None:
    """Make the container refuse this user (an ACL without them)."""
    with _Transaction() as conn:
        conn.execute("UPDATE conts SET denied = 1 WHERE label = ? OR uuid = ?", (cont, cont))


def inject(
    op: str, error: str, times: int = 1, match: bytes | str | None = None, applied: bool = False, skip: int = 0
) -> None:
    """Make the next `times` calls of shim function `op` (on a key containing `match`), after
    `skip` such calls, fail with DER error `error` (a name like 'DER_TIMEDOUT'); times=-1:
    every call. `applied` (kv_put): the failing key is written anyway, as when a reply is lost
    after the write."""
    if isinstance(match, str):
        match = match.encode()
    with _Transaction() as conn:
        conn.execute(
            "INSERT INTO faults (op, rc, remaining, match, applied, skip) VALUES (?, ?, ?, ?, ?, ?)",
            (op, -ERRORS[error], times, match, int(applied), skip),
        )


def clear_faults() -> None:
    with _Transaction() as conn:
        conn.execute("DELETE FROM faults")


def counters() -> dict[str, int]:
    return dict(_db().execute("SELECT name, value FROM counters").fetchall())


def dict_names(pool: str, cont: str) -> list[str]:
    conn = _db()
    pool_row = _find(conn, "pools", pool)
    cont_row = _find(conn, "conts", cont, pool=pool_row[0])
    return sorted(bytes(n).decode() for (n,) in conn.execute("SELECT name FROM objects WHERE cont = ?", (cont_row[0],)))


def dict_items(pool: str, cont: str, name: str) -> dict[bytes, bytes]:
    conn = _db()
    pool_row = _find(conn, "pools", pool)
    cont_row = _find(conn, "conts", cont, pool=pool_row[0])
    row = conn.execute("SELECT oid FROM objects WHERE cont = ? AND name = ?", (cont_row[0], name.encode())).fetchone()
    if row is None:
        return {}
    return {bytes(k): bytes(v) for k, v in conn.execute("SELECT key, value FROM kv WHERE oid = ?", (row[0],))}
