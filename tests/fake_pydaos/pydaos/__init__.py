"""A stand-in for DAOS's `pydaos` package, for tests only (no DAOS server can run here).

It follows the real package's Python API and the behaviour of its C shim (pydaos_shim.c,
DAOS 2.x), including the parts that are easy to get wrong:

- `DCont(pool, cont)` opens a pool and a container by label or UUID; the container must have
  layout type PYTHON, else `PyDError(... DER_INVAL)`. Without a reachable agent the first
  object fails with `PyDError("Failed to initialize DAOS: DER_AGENT_COMM")`, and the client
  singleton is kept uninitialized: later calls fail with DER_UNINIT until `DaosClient.cleanup()`.
- `PyDError(message, rc)` keeps only the text, "<message>: DER_<NAME>": no numeric attribute.
- `DCont.dict(name)` fails with DER_EXIST for a name in use; `DCont.get(name)` raises
  `DObjNotFound` for an unknown one. There is no way to delete a dict.
- DDict keys are `str` or `bytes` (anything else: TypeError); a key is a C string, so it ends at
  its first NUL. Values are `str` (stored as UTF-8) or `bytes` (not bytearray or memoryview:
  TypeError). Putting `None` or an empty value deletes the key.
- `bget` fills the given dict with `bytes` values, `None` for missing keys; a value larger than
  `value_size` (default 1 MiB) costs a second round trip (counted, see `_fake.counters`).
  `get` raises KeyError for a missing key. Iteration yields `str` keys in hash order, in pages
  of at most 256 keys and 4 KiB of key bytes at first, growing like the shim's.
- `bput`/`bget` are not atomic across keys: a failure leaves the keys before it done. An
  injected failure can also come after its key was written (a lost reply).

State lives in an SQLite database under $FAKE_PYDAOS_DIR, shared by every process, so mounts
in different processes see one namespace and survive restarts. Pools, containers and injected
failures are set up with `pydaos._fake` (not part of the real API).
"""

from __future__ import annotations

import atexit
import enum

from pydaos import _fake

DAOS_MAGIC = 0x7A89


class PyDError(Exception):
    """PyDAOS exception when operation cannot be completed."""

    def __init__(self, message, rc):
        err = _fake.err_to_str(rc)
        self.message = f"{message}: {err}" if err else f"{message}: {rc}"

    def __str__(self):
        return self.message


class DaosClient:
    """Handles DAOS init/fini; a singleton, like the real one: it is kept even when daos_init
    failed, so later calls do not initialize again (until cleanup())."""

    _instance = None

    @classmethod
    def cleanup(cls):
        cls._instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
            cls._instance._open()
        return cls._instance

    def _open(self):
        self.connected = False
        rc = _fake.daos_init()
        if rc != _fake.DER_SUCCESS:
            raise PyDError("Failed to initialize DAOS", rc)
        self.connected = True


@atexit.register
def _cleanup():
    DaosClient.cleanup()


ObjClassID = enum.Enum("ObjClassID", {"OC_S1": 200, "OC_SX": 214, "OC_RP_2GX": 240})


class DObjNotFound(Exception):
    """Raised by get if name associated with DAOS object not found"""

    def __init__(self, name):
        self.name = name
        super().__init__(self)

    def __str__(self):
        return f"Failed to open '{self.name}'"


class DCont:
    """A DAOS container of layout type PYTHON, opened by pool and container label or UUID."""

    def __init__(self, pool=None, cont=None, path=None):
        self._dc = DaosClient()
        self._hdl = None
        if path is None and (pool is None or cont is None):
            raise PyDError("invalid pool or container UUID", -_fake.DER_INVAL)
        if path is not None:
            raise PyDError("failed to access container", -_fake.DER_NOSYS)  # no unified namespace here
        self.pool = pool
        self.cont = cont
        ret, hdl = _fake.cont_open(pool, cont)
        if ret != _fake.DER_SUCCESS:
            raise PyDError("failed to access container", ret)
        self._hdl = hdl

    def get(self, name):
        ret, oid, otype = _fake.cont_get(self._hdl, name)
        if ret == -_fake.DER_NONEXIST:
            raise DObjNotFound(name)
        if ret != _fake.DER_SUCCESS:
            raise PyDError("failed to look up name", ret)
        if otype == _fake.PYDAOS_DICT:
            return DDict(name, self._hdl, oid, self)
        raise DObjNotFound(name)

    def __getitem__(self, name):
        return self.get(name)

    def dict(self, name, v: dict = None):
        ret, oid = _fake.cont_newobj(self._hdl, name, _fake.PYDAOS_DICT)
        if ret != _fake.DER_SUCCESS:
            raise PyDError("failed to create DAOS dict", ret)
        dd = DDict(name, self._hdl, oid, self)
        dd.bput(v)
        return dd

    def array(self, name, v: list = None):
        raise NotImplementedError

    def __str__(self):
        return f"{self.pool}/{self.cont}"

    def __repr__(self):
        return f"daos://{self.pool}/{self.cont}"


class DDictIter:
    """Pages through the keys like the real iterator (256 keys and 4 KiB of keys at first)."""

    def __init__(self, ddict):
        self._entries = []
        self._nr = 256
        self._size = 4096
        self._anchor = None
        self._done = False
        self._kv = ddict

    def __iter__(self):
        return self

    def __next__(self):
        if self._entries:
            return self._entries.pop()
        if self._done:
            raise StopIteration()
        ret, nr, size, anchor = _fake.kv_iter(self._kv.oh, self._entries, self._nr, self._size, self._anchor)
        if ret != _fake.DER_SUCCESS:
            raise PyDError("failed to enumerate Dictionary", ret)
        self._anchor, self._nr, self._size = anchor, nr, size
        if anchor is None:
            self._done = True
        if self._entries:
            return self._entries.pop()
        raise StopIteration()


class DDict:
    """A DAOS dictionary (key-value object). See the module docstring for its rules."""

    value_size = 1024 * 1024

    def __init__(self, name, hdl, oid, cont):
        self._dc = DaosClient()
        self.name = name
        self.oid = oid
        self.cont = cont
        ret, oh = _fake.kv_open(hdl, oid)
        if ret != _fake.DER_SUCCESS:
            raise PyDError("failed to open object", ret)
        self.oh = oh

    def __str__(self):
        return self.name

    def get(self, key):
        d = {key: None}
        self.bget(d)
        if d[key] is None:
            raise KeyError(key)
        return d[key]

    def __getitem__(self, key):
        return self.get(key)

    def put(self, key, val):
        self.bput({key: val})

    def __setitem__(self, key, val):
        self.put(key, val)

    def __delitem__(self, key):
        self.put(key, None)

    def pop(self, key):
        self.put(key, None)

    def bget(self, d, value_size=None):
        if d is None:
            return d
        if value_size is None:
            value_size = self.value_size
        ret = _fake.kv_get(self.oh, d, value_size)
        if ret != _fake.DER_SUCCESS:
            raise PyDError("failed to retrieve KV value", ret)
        return d

    def bput(self, d):
        if d is None:
            return
        ret = _fake.kv_put(self.oh, d)
        if ret != _fake.DER_SUCCESS:
            raise PyDError("failed to store KV value", ret)

    def dump(self):
        d = {key: None for key in self}
        self.bget(d)
        return d

    def __len__(self):
        return sum(1 for _ in self)

    def __bool__(self):
        for _ in self:
            return True
        return False

    def __contains__(self, key):
        try:
            self.get(key)
            return True
        except KeyError:
            return False

    def __iter__(self):
        return DDictIter(self)


class DArray:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError
