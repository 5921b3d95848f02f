"""Compiled programs kept across processes, so a second run skips tracing, lowering and compiling.

JAX's persistent compilation cache only saves the XLA compile: every new process still traces the
function and lowers it to StableHLO to find the cache entry (for the interleaved generator, 1.1 s of
its 1.6 s cold start on CPU). A `Program` stores the whole serialized executable under
`<jax_compilation_cache_dir>/programs/`, keyed by everything that determines it: the function's name
and module source, the mg5jax sources, the jax / jaxlib / flax / optax releases, the backend and its
devices, XLA_FLAGS, the host CPU, JAX's configuration, the static and donated argument numbers, the
static arguments (pickled) and the dynamic arguments' tree, shapes, dtypes and shardings. Any change
misses and compiles anew. Only module-level functions of mg5jax (or made `persist`) are stored;
closures, lambdas, other functions, programs whose static arguments cannot be pickled or refer to classes
or functions of other code (a user's own module inside a model: pickle names it without its code), and
programs that cannot be serialized stay in memory, as a plain `jax.jit`'s do; so does everything when no
compilation cache directory is configured, JAX runs multi-process, or MG5JAX_AOT=0. Stored programs are
kept to `MAX_BYTES` in all, the least recently used removed first.

The store holds pickles and native code that a run loads and executes: it must be a directory only
trusted users can write to (as JAX's own compilation cache must be).

Loading a stored program still costs its deserialization (0.01–0.2 s each on CPU for the generator's
five). `preload(name)` moves that off the critical path: it loads, in a background thread, the programs
that the last run under the same name used (listed in `programs/<name>.json`), and runs one small program
(the backend sets up its GEMM and reduction libraries on their first use), while the caller goes on
loading weights; a program asked for later takes the loaded executable, waiting for it if need be. On
an accelerator each preloaded program whose arguments (weights included) take at most 1 GiB also runs
once on zeros, until the caller first asks for a program: the first run of a program on a GPU loads its
kernels and records its command buffers.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import copyreg
import dataclasses
import functools
import hashlib
import importlib.metadata
import inspect
import io
import json
import logging
import os
import pathlib
import pickle
import re
import sys
import threading
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import config as jax_config  # trace_context: what jit keys its own caches on
from jax.experimental import serialize_executable

from mg5jax.convert.sources import write_atomically

log = logging.getLogger(__name__)

FORMAT = "mg5jax-program-2"
MAX_BYTES = 4 << 30  # stored programs beyond this total are removed, least recently used first
_PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "ml_dtypes")
MAX_PRELOAD = 32  # programs a preload list holds (first used first)


@functools.cache
def _installation() -> str:
    """Python, the jax / jaxlib / flax / optax / numpy / ml_dtypes releases and a sha256 over every Python source of the
    mg5jax package (what a traced program can run): fixed for the life of a process."""
    root = pathlib.Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return repr([FORMAT, sys.version, h.hexdigest(), *(f"{p}={_version(p)}" for p in _PACKAGES)])


def _module_digest(fun, persist: bool) -> str | None:
    """sha256 of the file that defines `fun`. None (not stored) when `fun` is not a module-level
    function, or not one of mg5jax unless `persist`: a closure's or a lambda's name and module do not
    say what it computes, the values it closes over may be baked into the program, and code outside
    mg5jax may call helpers in other files, whose sources are in no key."""
    if not isinstance(fun, types.FunctionType) or "<" in fun.__qualname__ or fun.__closure__ \
            or not (persist or fun.__module__.startswith("mg5jax.")):
        return None
    try:
        return hashlib.sha256(pathlib.Path(inspect.getsourcefile(fun)).read_bytes()).hexdigest()
    except (TypeError, OSError):
        return None


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def _stable_repr(value) -> str:
    """repr without memory addresses (they differ between processes)."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(value))


def _environment() -> bytes:
    """What a compiled program depends on besides its arguments, as stable text."""
    devices = jax.devices()
    client = devices[0].client
    parts = [
        _installation(),
        client.platform, client.platform_version, jax.process_count(),
        [(d.id, d.device_kind, d.process_index) for d in devices],
        os.environ.get("XLA_FLAGS", ""), os.environ.get("LIBTPU_INIT_ARGS", ""), _host_cpu(),
        sorted((k, _stable_repr(v)) for k, v in jax.config.values.items()),
        _stable_repr(jax_config.trace_context()),
    ]
    return repr(parts).encode()


@functools.cache
def _host_cpu() -> str:
    """The host CPU's model and instruction-set flags: XLA:CPU code is built for them."""
    try:
        info = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform

        return f"{platform.machine()} {platform.processor()}"
    lines = [line for line in info.splitlines() if line.startswith(("model name", "flags", "Features"))]
    return hashlib.sha256("\n".join(sorted(set(lines))).encode()).hexdigest()


_HELD = 64  # static-argument identities remembered per program (and digests in all)
_DIGESTS: collections.OrderedDict = collections.OrderedDict()  # id -> (object, digest); holding the
#                                                               object keeps its id unique


class _CodePickler(pickle.Pickler):
    """A pickler that notes the module of every class and function it writes (pickle stores them by
    name only: their code is in no pickle)."""

    def __init__(self, file):
        super().__init__(file, protocol=5)
        self.modules: set[str] = set()

    def reducer_override(self, obj):
        if isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType, types.MethodType)):
            self.modules.add(getattr(obj, "__module__", None) or "?")
        return NotImplemented


def _keyed_code(module: str, own: str | None = None) -> bool:
    """Whether the key covers a module's code: mg5jax's sources, the keyed packages' releases,
    Python's own standard library (with `sys.version`), and `own`, the stored function's module (its
    file's digest)."""
    top = module.split(".", 1)[0]
    return module == own or top in ("mg5jax", "builtins", *_PACKAGES) or top in sys.stdlib_module_names


_DATACLASS_GETSTATE = getattr(dataclasses, "_dataclass_getstate", None)  # slotted dataclasses' __getstate__


def _plain_dataclass(cls) -> bool:
    """A slotted dataclass that `object.__reduce_ex__` reduces to its class and its fields' values alone."""
    return (_DATACLASS_GETSTATE is not None and getattr(cls, "__getstate__", None) is _DATACLASS_GETSTATE
            and cls.__reduce_ex__ is object.__reduce_ex__ and cls.__reduce__ is object.__reduce__
            and not hasattr(cls, "__getnewargs__") and not hasattr(cls, "__getnewargs_ex__")
            and not issubclass(cls, (list, dict)))  # their items would be pickled too


class _Reductions(dict):
    """A pickler's dispatch table that gives the bytes `pickle.dumps` gives, faster for a model's graph:
    a slotted dataclass (flax's graph nodes, thousands of them) is reduced as `object.__reduce_ex__`
    would reduce it, without a `dataclasses.fields` call per object; classes are saved by name and
    everything else by its own `__reduce_ex__`, as pickle does (copyreg's table first)."""

    def __missing__(self, cls):
        if cls in copyreg.dispatch_table:
            reduce = copyreg.dispatch_table[cls]
        elif _plain_dataclass(cls):
            names = tuple(f.name for f in dataclasses.fields(cls))

            def reduce(obj):
                return copyreg.__newobj__, (cls,), [getattr(obj, n) for n in names]
        elif issubclass(cls, type):
            def reduce(obj):
                return getattr(obj, "__qualname__", None) or obj.__name__
        else:
            def reduce(obj):
                return obj.__reduce_ex__(5)
        self[cls] = reduce
        return reduce


_REDUCTIONS = _Reductions()


def _pickled(obj) -> bytes:
    """`pickle.dumps(obj, protocol=5)`, through `_REDUCTIONS`."""
    out = io.BytesIO()
    pickler = pickle.Pickler(out, protocol=5)
    pickler.dispatch_table = _REDUCTIONS
    pickler.dump(obj)
    return out.getvalue()


def _pickled_digest(obj) -> bytes:
    """sha256 of a static argument, pickled; kept per object (pickling a model's graph takes ~10 ms)."""
    held = _DIGESTS.get(id(obj))
    if held is None or held[0] is not obj:
        held = _DIGESTS[id(obj)] = (obj, hashlib.sha256(_pickled(obj)).digest())
        if len(_DIGESTS) > _HELD:
            _DIGESTS.popitem(last=False)
    else:
        _DIGESTS.move_to_end(id(obj))
    return held[1]


def _foreign_code(static: tuple, own: str | None) -> list[str]:
    """Modules outside the key whose classes or functions the static arguments refer to (a user's own
    module in a model graph): pickle names them without their code, so an edit would go unnoticed.
    Checked before a program is stored (a Python-level pickler is several times slower than the key's):
    a stored file's key is the same pickle bytes, and so the same module names, as a checked one."""
    pickler = _CodePickler(io.BytesIO())
    for obj in static:
        if not _plain(obj):
            pickler.dump(obj)
    return sorted(m for m in pickler.modules if not _keyed_code(m, own))


def _plain(x) -> bool:
    """A None, bool, int, float, str, or a tuple of them: cheap to hash and compared by value."""
    if isinstance(x, tuple):
        return len(x) <= 16 and all(_plain(v) for v in x)
    return x is None or type(x) in (bool, int, float, str)


def _typed(x) -> tuple:
    """A plain static value as a key that tells 1, 1.0 and True apart, as `jax.jit` does."""
    return type(x), x


def _leaf_signature(x) -> tuple:
    return (x.shape, x.dtype, getattr(x, "weak_type", False), getattr(x, "sharding", None))


@functools.lru_cache(maxsize=4096)
def _leaf_text(shape: tuple, dtype, weak_type: bool, sharding) -> str:
    """A dynamic argument's part of the key (kept per signature: a model's parameters share a few)."""
    if sharding is None:
        placed = "-"
    else:
        mesh = getattr(sharding, "mesh", None)
        ids = [d.id for d in mesh.devices.flat] if mesh is not None and hasattr(mesh, "devices") else \
            sorted(d.id for d in sharding.device_set)
        placed = f"{_stable_repr(sharding)}{ids}"
    return f"{tuple(shape)}{dtype}{bool(weak_type)}{placed}"


class Program:
    """`jax.jit(fun, static_argnums=…, donate_argnums=…)` (positional arguments only; the dynamic ones
    arrays) whose compiled executables persist on disk. `program(*args)` runs it; `program.compile(*args)`
    returns the `jax.stages.Compiled` to call with the dynamic arguments alone; `program.jitted` is the
    plain `jax.jit` (for `eval_shape` or an ahead-of-time `lower`). `persist=True` stores a function
    from outside mg5jax too: its caller vouches that what it computes is all in its own file."""

    def __init__(self, fun, *, static_argnums: tuple[int, ...] = (), donate_argnums: tuple[int, ...] = (),
                 persist: bool = False):
        if any(i < 0 for i in (*static_argnums, *donate_argnums)):
            raise ValueError(f"Program: argument numbers must be >= 0, got static {static_argnums}, "
                             f"donated {donate_argnums}")
        self.name = f"{getattr(fun, '__module__', None)}.{getattr(fun, '__qualname__', type(fun).__name__)}"
        self._module_digest = _module_digest(fun, persist)
        self._module = getattr(fun, "__module__", None)
        self.static_argnums = tuple(static_argnums)
        self.donate_argnums = tuple(donate_argnums)
        self.jitted = jax.jit(fun, static_argnums=static_argnums, donate_argnums=donate_argnums)
        self._compiled: dict = {}
        self._by_id: collections.OrderedDict = collections.OrderedDict()  # the newest _HELD identities

    def _split(self, args: tuple) -> tuple[tuple, tuple]:
        static = tuple(args[i] for i in self.static_argnums)
        dynamic = tuple(a for i, a in enumerate(args) if i not in self.static_argnums)
        return static, dynamic

    def __call__(self, *args):
        return self.compile(*args)(*self._split(args)[1])

    def compile(self, *args) -> jax.stages.Compiled:
        """The executable for these arguments: from memory, from disk, or traced and compiled now."""
        static, dynamic = self._split(args)
        leaves, treedef = jax.tree.flatten(dynamic)
        dynamic_signature = (treedef, tuple(_leaf_signature(x) for x in leaves))
        # static arguments (graph definitions: slow to hash) are looked up by identity first; small
        # plain values (a shape tuple made anew per call) by value and type; JAX's context (default
        # device, x64, mesh) as jit's own cache does
        context = jax_config.trace_context()
        by_id = (tuple(_typed(a) if _plain(a) else id(a) for a in static), dynamic_signature, context)
        held = self._by_id.get(by_id)
        if held is not None and all(a is b or _plain(a) for a, b in zip(held[0], static)):
            self._by_id.move_to_end(by_id)
            return held[1]
        path = self._path(static, dynamic_signature)
        # a path is cheaper to hash than a model's graph (and holds the context)
        signature = path or (tuple(_typed(a) if _plain(a) else a for a in static), dynamic_signature, context)
        compiled = self._compiled.get(signature)
        if compiled is None:
            start = time.perf_counter()
            in_tree = jax.tree.structure((dynamic, {}))
            if path is None:
                compiled = self.jitted.lower(*args).compile()
            elif (compiled := _preloaded(path, in_tree)) is not None:
                log.info("%s: preloaded from %s (waited %.2f s)", self.name, path, time.perf_counter() - start)
            elif (compiled := self._load(path, in_tree)) is not None:
                log.info("%s: loaded from %s in %.2f s", self.name, path, time.perf_counter() - start)
            else:
                compiled = self._compile_fresh(args)
                log.info("%s: traced and compiled in %.2f s", self.name, time.perf_counter() - start)
                if foreign := _foreign_code(static, self._module):
                    log.debug("%s: not kept on disk (static arguments refer to %s)", self.name, foreign)
                    path = None
                else:
                    self._store(path, compiled, in_tree)
            self._compiled[signature] = compiled
            if path is not None:
                _used(path)
        self._by_id[by_id] = (static, compiled)  # holding `static` keeps its ids from being reused
        if len(self._by_id) > _HELD:  # equal static arguments made anew per call must not pile up
            self._by_id.popitem(last=False)
        return compiled

    # ----------------------------------------------------------------------------------------- on disk

    def _compile_fresh(self, args: tuple) -> jax.stages.Compiled:
        """Compile without JAX's persistent cache: an executable that comes from it does not survive being
        serialized again on XLA:CPU (jaxlib 0.10: running the copy fails with "Function … not found").
        A compiler option at its default value gives the program a cache key of its own, and the
        minimum compile time keeps JAX from writing an entry under that key."""
        with jax_config.persistent_cache_min_compile_time_secs(float("inf")):
            return self.jitted.lower(*args).compile(compiler_options={"xla_embed_ir_in_executable": False})

    def _path(self, static: tuple, dynamic_signature: tuple) -> pathlib.Path | None:
        directory = jax.config.jax_compilation_cache_dir
        if not directory or os.environ.get("MG5JAX_AOT") == "0" or jax.process_count() > 1 \
                or self._module_digest is None:
            return None  # on disk: one process's programs, whose code can be read
        try:
            h = hashlib.sha256(_environment())
            h.update(self.name.encode())
            h.update(self._module_digest.encode())
            h.update(repr((self.static_argnums, self.donate_argnums)).encode())
            for obj in static:
                h.update(_pickled_digest(obj))
        except Exception as e:  # an unpicklable static argument: no stable key, compile as usual
            log.debug("%s: not kept on disk (%s)", self.name, e)
            return None
        treedef, leaves = dynamic_signature
        h.update(str(treedef).encode())
        h.update("".join(_leaf_text(*leaf) for leaf in leaves).encode())
        return pathlib.Path(directory) / "programs" / f"{self.name.rsplit('.', 1)[-1]}-{h.hexdigest()[:32]}.bin"

    def _load(self, path: pathlib.Path, in_tree) -> jax.stages.Compiled | None:
        try:
            return _read(path, in_tree)
        except FileNotFoundError:
            return None
        except Exception as e:  # a corrupt or foreign file: compile anew and replace it
            log.warning("%s: ignoring unreadable compiled program %s (%s: %s)", self.name, path,
                        type(e).__name__, e)
            return None

    def _store(self, path: pathlib.Path, compiled: jax.stages.Compiled, in_tree) -> None:
        try:
            payload, _, out_tree = serialize_executable.serialize(compiled)
            devices = [d.id for d in compiled._executable.xla_executable.local_devices()]
            data = pickle.dumps(dict(payload=payload, in_tree=in_tree, out_tree=out_tree, devices=devices),
                                protocol=5)
        except Exception as e:  # e.g. closed-over constants: the program stays in memory only
            log.debug("%s: not kept on disk (%s: %s)", self.name, type(e).__name__, e)
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, data, prefix=f"{path.name}.")  # readable as a plain file is (umask)
            _evict(path.parent, keep=path)
        except OSError as e:  # a read-only or full store: the program stays in memory only
            log.warning("%s: cannot store the compiled program in %s (%s)", self.name, path.parent, e)


def _read(path: pathlib.Path, in_tree=None) -> jax.stages.Compiled:
    """Deserialize a stored program (for `in_tree`, default the one it was stored for) and mark it
    recently used."""
    record = pickle.loads(path.read_bytes())
    by_id = {d.id: d for d in jax.devices()}
    devices = [by_id[i] for i in record["devices"]]
    compiled = serialize_executable.deserialize_and_load(
        record["payload"], record["in_tree"] if in_tree is None else in_tree, record["out_tree"],
        backend=devices[0].client, execution_devices=devices)
    try:
        os.utime(path)  # recently used: evicted last
    except OSError:
        pass
    return compiled


# ------------------------------------------------------------------------------------------- preload

_PRELOADED: dict[pathlib.Path, concurrent.futures.Future] = {}  # path -> Future[Compiled]
_RECORD: dict = {}  # the list being recorded: "file" (its path) and "names" (programs, first used first)
_LOCK = threading.Lock()
_ASKED = threading.Event()  # set once a caller asks for a program: the device then runs its work
RUN_ONCE_MAX_BYTES = 1 << 30  # a preloaded program with larger arguments is not run on zeros ahead


def preload(name: str) -> threading.Thread | None:
    """Load, in a daemon thread, the stored programs the last run recorded under `name`, and record
    the ones this run uses (first used first, at most MAX_PRELOAD) under `name` for the next. Call it
    once, early (before loading weights); returns the thread, or None when there is nothing to load
    (no compilation cache directory, several processes, MG5JAX_AOT=0, or no list yet)."""
    directory = jax.config.jax_compilation_cache_dir
    if not directory or os.environ.get("MG5JAX_AOT") == "0" or jax.process_count() > 1:
        return None
    programs = pathlib.Path(directory) / "programs"
    listing = programs / f"{name}.json"
    environment = hashlib.sha256(_environment()).hexdigest()
    with _LOCK:
        _RECORD.update(file=listing, environment=environment, names=[])
    try:
        recorded = json.loads(listing.read_text())
        names = list(recorded["programs"]) if recorded.get("environment") == environment else []
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    paths = [programs / n for n in names[:MAX_PRELOAD] if isinstance(n, str) and "/" not in n]
    if not paths:
        return None
    futures = {p: concurrent.futures.Future() for p in paths}
    with _LOCK:
        for p, future in futures.items():
            _PRELOADED.setdefault(p, future)

    exiting = threading.Event()

    # XLA:CPU's first runs cost little, and its cores are loading the weights
    first_runs = jax.default_backend() != "cpu"

    def load_all():
        for p, future in futures.items():
            if exiting.is_set():
                return
            if _PRELOADED.get(p) is not future or not future.set_running_or_notify_cancel():
                continue
            try:
                start = time.perf_counter()
                compiled = _read(p)
                loaded = time.perf_counter()
                ran = first_runs and not _ASKED.is_set() and _run_once(compiled)
                future.set_result(compiled)
                log.info("preloaded %s in %.2f s%s", p.name, loaded - start,
                         f" (first run {time.perf_counter() - loaded:.2f} s)" if ran else "")
            except Exception as e:  # gone or unreadable: the caller loads or compiles it itself
                future.set_exception(e)
        if not exiting.is_set():
            _warm_up_kernels()

    def finish():  # an interpreter that exits while the thread is inside XLA aborts (SIGABRT)
        exiting.set()
        thread.join()

    thread = threading.Thread(target=load_all, name=f"mg5jax-preload-{name}", daemon=True)
    _ASKED.clear()  # a new loading phase: its programs run first until a caller asks for one
    thread.start()
    atexit.register(finish)
    return thread


def _first_kernels(x):
    y = x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True))
    return y @ y.T


def _warm_up_kernels() -> None:
    """Run one small program with a matrix product and a row reduction. A process's first of each sets
    up a library (XLA:CPU: oneDNN generates its GEMM kernels, 25 ms of the interleaved generator's first
    30 ms splice here; YNNPACK initialises, ~5 ms), which would otherwise fall on the first real call."""
    start = time.perf_counter()
    try:
        jax.block_until_ready(jax.jit(_first_kernels)(np.ones((64, 256), np.float32)))
    except Exception as e:  # a backend that cannot: the first real call pays instead
        log.debug("kernel warm-up failed (%s: %s)", type(e).__name__, e)
        return
    log.info("kernel warm-up in %.2f s", time.perf_counter() - start)


def _run_once(compiled: jax.stages.Compiled) -> bool:
    """Run a loaded program once on zeros if its arguments take at most RUN_ONCE_MAX_BYTES; returns
    whether it ran. A GPU loads a program's kernels and records its command buffers on its first run
    (0.1 s of the demo generator's 0.2 s first response on an H200), which would otherwise fall on the
    first real call. The arguments include the weights: at full size only the small programs qualify,
    and a loop whose trip count is an argument runs no iterations on zeros."""
    try:
        infos = compiled.in_tree.flatten_up_to(compiled.args_info)
        shardings = compiled.in_tree.flatten_up_to(compiled.input_shardings)  # None: an argument not used
        if sum(np.prod(i.shape) * np.dtype(i.dtype).itemsize for i in infos
               if not jax.dtypes.issubdtype(i.dtype, jax.dtypes.prng_key)) > RUN_ONCE_MAX_BYTES:
            return False
        leaves = []
        for info, sharding in zip(infos, shardings):
            if jax.dtypes.issubdtype(info.dtype, jax.dtypes.prng_key):
                x = jax.random.split(jax.random.key(0), info.shape)
            else:
                x = np.zeros(info.shape, info.dtype)
            leaves.append(x if sharding is None else jax.device_put(x, sharding))
        args, kwargs = compiled.in_tree.unflatten(leaves)
        jax.block_until_ready(compiled(*args, **kwargs))
    except Exception as e:  # e.g. a key of another implementation: the first real call pays instead
        log.debug("first run on zeros failed (%s: %s)", type(e).__name__, e)
        return False
    return True


def _preloaded(path: pathlib.Path, in_tree) -> jax.stages.Compiled | None:
    """The executable preloaded for `path`, waiting for it if it is being loaded; None if it was not
    listed, could not be read, or was stored for other arguments."""
    _ASKED.set()  # real work has begun: later preloads are not run first
    with _LOCK:
        future = _PRELOADED.pop(path, None)
    if future is None or future.cancel():  # not started yet: load it here instead
        return None
    try:
        compiled = future.result()
    except Exception:
        return None
    return compiled if compiled.in_tree == in_tree else None


def _used(path: pathlib.Path) -> None:
    """Add a program to the list being recorded, and rewrite the list when it grew."""
    with _LOCK:
        names, listing = _RECORD.get("names"), _RECORD.get("file")
        if names is None or path.name in names or len(names) >= MAX_PRELOAD:
            return
        names.append(path.name)
        text = json.dumps({"environment": _RECORD["environment"], "programs": names})
    try:
        write_atomically(listing, text, prefix=f"{listing.name}.")
    except OSError as e:
        log.debug("cannot write the preload list %s (%s)", listing, e)


def _evict(directory: pathlib.Path, keep: pathlib.Path) -> None:
    """Remove the least recently used stored programs while they total more than MAX_BYTES, and
    writes that a killed process left unfinished an hour ago or more."""
    for p in directory.glob("*.tmp"):
        try:
            if time.time() - p.stat().st_mtime > 3600:
                p.unlink(missing_ok=True)
        except FileNotFoundError:
            continue
    files = []
    for p in directory.glob("*.bin"):
        try:
            st = p.stat()
        except FileNotFoundError:  # removed by another process meanwhile
            continue
        files.append((st.st_mtime, st.st_size, p))
    total = sum(size for _, size, _ in files)
    for _, size, p in sorted(files):
        if total <= MAX_BYTES:
            break
        if p != keep:
            try:
                p.unlink(missing_ok=True)
            except OSError as e:  # another user's file in a shared store: leave it
                log.debug("cannot remove %s (%s)", p, e)
                continue
            total -= size
            log.info("removed the least recently used compiled program %s", p)
