"""llama.cpp as a benchmark peer: build `llama-server`, export the student to GGUF, run the server.

Bench-only: the package never imports this. Everything comes from one pinned llama-cpp-python sdist on PyPI
(its vendored llama.cpp sources, `convert_hf_to_gguf.py` and `gguf-py`), so the server, the converter and the
GGUF format all match, and nothing is fetched from the Hugging Face hub (the server's web UI is not
downloaded either). Builds, sources and GGUF files are cached under
`cache_dir()/bench/llama.cpp-<version>`, so only the first run compiles.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from leap_dspy.lm.models import DEFAULT_MODEL, cache_dir, resolve_model

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
"""The llama-cpp-python sdist whose vendored llama.cpp is built (pinned so results can be reproduced)."""

CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",  # one self-contained binary in the cache
    "-DLLAMA_CURL=OFF",  # no downloads at run time (deprecated option in newer trees, harmless)
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",  # llama-server lives under tools/server in this tree
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",  # no npm build of the web UI ...
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # ... and no download of a prebuilt one from a Hugging Face bucket
    "-DGGML_NATIVE=ON",  # tuned to this CPU, as a user building llama.cpp locally would get
)


CONVERTER_DEPS = "sentencepiece>=0.1.98,<0.3.0"
"""As pinned by the vendored requirements/requirements-convert_hf_to_gguf.txt (the rest is in the venv)."""


class LlamaCppError(RuntimeError):
    """Building, converting or serving failed; the message says why (the bench prints it and skips the row)."""


def bench_dir() -> Path:
    """The cache folder of this pinned llama.cpp version."""
    path = cache_dir() / "bench" / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _run(cmd: list[str], log: Path, what: str, **kwargs: object) -> None:
    """Run a build step at the lowest CPU priority (other jobs share the machine), its output in `log`."""
    nice = ["nice", "-n", "19"] if shutil.which("nice") else []
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        done = subprocess.run(nice + cmd, stdout=out, stderr=subprocess.STDOUT, check=False, **kwargs)
    if done.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise LlamaCppError(f"{what} failed (exit {done.returncode}); last lines of {log}:\n{tail}")


def llama_cpp_source() -> Path:
    """The vendored llama.cpp tree of the pinned sdist, downloaded with pip and unpacked once."""
    root = bench_dir()
    source = root / "llama.cpp"
    if (source / "CMakeLists.txt").exists():
        return source
    sdist_dir = root / "sdist"
    sdist_dir.mkdir(exist_ok=True)
    sdists = sorted(sdist_dir.glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        print(f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist (llama.cpp sources) with pip")
        _run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--quiet",
              f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(sdist_dir)], root / "download.log",
             "pip download of the llama-cpp-python sdist")
        sdists = sorted(sdist_dir.glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        raise LlamaCppError(f"pip left no llama-cpp-python sdist in {sdist_dir}")
    tmp = Path(tempfile.mkdtemp(prefix="llama.cpp.", dir=root))
    with tarfile.open(sdists[0]) as archive:
        prefix = f"{archive.getnames()[0].split('/')[0]}/vendor/llama.cpp/"
        members = [m for m in archive.getmembers() if m.name.startswith(prefix) and "/.git/" not in m.name]
        for member in members:
            member.name = member.name[len(prefix):]
        archive.extractall(tmp, members=members, filter="data")
    if not (tmp / "CMakeLists.txt").exists():
        raise LlamaCppError(f"{sdists[0].name} has no vendored llama.cpp (no vendor/llama.cpp/CMakeLists.txt)")
    os.replace(tmp, source)
    return source


def build_llama_server() -> Path:
    """The `llama-server` binary of the pinned llama.cpp, compiled on first use (minutes, 2 jobs, nice 19)."""
    root = bench_dir()
    binary = root / "build" / "bin" / "llama-server"
    if binary.exists():
        return binary
    missing = [tool for tool in ("cmake", "c++", "cc") if shutil.which(tool) is None]
    if missing:
        raise LlamaCppError(f"building llama-server needs {', '.join(missing)} on PATH (e.g. apt-get install "
                            "cmake build-essential)")
    source = llama_cpp_source()
    log = root / "build.log"
    build = root / "build"
    start = time.perf_counter()
    print(f"building llama-server from llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} (first run only; log: {log})")
    _run(["cmake", "-S", str(source), "-B", str(build), *CMAKE_FLAGS], log, "cmake configure")
    _run(["cmake", "--build", str(build), "--target", "llama-server", "-j", "2"], log, "cmake build")
    if not binary.exists():
        found = list(build.rglob("llama-server"))
        if not found:
            raise LlamaCppError(f"the build finished without a llama-server binary under {build}")
        binary.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(found[0], binary)
    print(f"built {binary} in {time.perf_counter() - start:.0f} s")
    return binary


def _adapter_stamp(adapter: str | None) -> str:
    """The adapter's resolved path and newest file time: a retrained adapter in the same folder re-exports."""
    if adapter is None:
        return "none"
    path = Path(adapter).expanduser().resolve()
    if not (path / "adapter_config.json").exists():
        raise LlamaCppError(f"{path} is not a PEFT adapter folder (no adapter_config.json)")
    newest = max(f.stat().st_mtime_ns for f in path.rglob("*") if f.is_file())
    return f"{path}@{newest}"


def export_gguf(model: str = DEFAULT_MODEL, adapter: str | None = None, outtype: str = "f16") -> Path:
    """The student the engine runs (`model` + merged `adapter`) as a GGUF for llama.cpp, cached.

    The embedded Q4_1 GGUF would serve as is without an adapter, but the engine runs its dequantised float
    weights, so both sides start from the same transformers folder: like-for-like, and the same path with or
    without a LoRA. `outtype` is f16 (default), bf16, f32 or q8_0.
    """
    if outtype not in ("f16", "bf16", "f32", "q8_0"):
        raise ValueError(f"outtype must be f16, bf16, f32 or q8_0, not {outtype!r}")
    folder = Path(resolve_model(model))
    if not (folder / "config.json").exists():
        raise LlamaCppError(f"{model!r} resolves to {folder}, not a local transformers folder")
    key = hashlib.sha1(f"{folder.resolve()}|{_adapter_stamp(adapter)}|{outtype}".encode()).hexdigest()[:12]
    out = bench_dir() / "gguf" / f"{folder.name}-{key}.{outtype}.gguf"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="export.", dir=out.parent) as tmp:
        if adapter is not None:
            from leap_dspy.train.merge import merge_adapter

            # float32, so the small LoRA delta is not rounded away before the GGUF's own rounding
            folder = merge_adapter(model, adapter, Path(tmp) / "merged", dtype="float32")
        _convert(folder, Path(tmp) / out.name, outtype)
        os.replace(Path(tmp) / out.name, out)
    return out


def _converter_deps() -> Path:
    """A private folder with the converter's one import the venv lacks (sentencepiece, imported before it
    checks for a tokenizer.model), so the project's own environment is left untouched."""
    target = bench_dir() / "convert-deps"
    if not (target / "sentencepiece").exists():
        _run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
              CONVERTER_DEPS], bench_dir() / "convert.log", f"pip install {CONVERTER_DEPS}")
    return target


def _convert(folder: Path, out: Path, outtype: str) -> None:
    """Run the vendored converter with the vendored `gguf-py` first on the path (its GGUF writer must match)."""
    source = llama_cpp_source()
    paths = [source / "gguf-py", source, _converter_deps()]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(
        [str(p) for p in paths] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    print(f"exporting {folder} to {out.name} with llama.cpp's convert_hf_to_gguf.py")
    _run([sys.executable, str(source / "convert_hf_to_gguf.py"), str(folder), "--outfile", str(out),
          "--outtype", outtype], bench_dir() / "convert.log", "convert_hf_to_gguf.py", env=env, cwd=source)


@dataclasses.dataclass
class LlamaServer:
    """A running `llama-server`: its base URL, its process, and (after it stops) its peak resident memory."""

    url: str
    process: subprocess.Popen
    log: Path
    peak_rss_bytes: int | None = None

    def peak_rss(self) -> int | None:
        """The server's peak resident set size so far (VmHWM), or None once it has exited."""
        try:
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(server: LlamaServer, timeout_s: float) -> None:
    """Poll `/health` until the model is loaded: requests sent earlier would fail with 503."""
    deadline = time.monotonic() + timeout_s
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # localhost: never via a proxy
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise LlamaCppError(f"llama-server exited with code {server.process.returncode} while starting; "
                                f"last log lines:\n{server.log_tail()}")
        with contextlib.suppress(urllib.error.URLError, OSError, ValueError), \
                opener.open(f"{server.url}/health", timeout=2) as response:
            if json.loads(response.read() or b"{}").get("status") == "ok":
                return
        time.sleep(0.25)
    raise LlamaCppError(f"llama-server was not healthy after {timeout_s:.0f} s; last log lines:\n{server.log_tail()}")


_live: set[subprocess.Popen] = set()
"""Servers started and not yet stopped: `stop_all_servers` ends them when the caller is being terminated."""


def stop_all_servers() -> None:
    """Stop every running `llama_server` (for a SIGTERM handler: a `with` block may not unwind in time)."""
    for process in list(_live):
        _stop(process)


def _stop(process: subprocess.Popen) -> None:
    _live.discard(process)
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def llama_server(gguf: str | os.PathLike[str], parallel: int, threads: int = 2, ctx_per_slot: int = 2048, *,
                 cache_ram_mib: int = 1024, binary: Path | None = None,
                 startup_timeout_s: float = 180.0) -> Iterator[LlamaServer]:
    """Serve `gguf` with `parallel` slots (continuous batching across them) on a free local port.

    Yields a `LlamaServer` (its `.url` is the base URL; append `/v1` for the OpenAI API). On exit the server's
    peak RSS is read into `.peak_rss_bytes`, then it is terminated (killed if it does not stop in 10 s).
    `cache_ram_mib` caps the host-memory prompt cache (llama-server's default, 8 GiB, would let a long run
    grow far past what the weights and KV cache need); its log is kept only when something failed.
    """
    binary = binary or build_llama_server()
    port = _free_port()
    log = Path(tempfile.mkstemp(prefix=f"llama-server-{port}.", suffix=".log")[1])
    cmd = [str(binary), "-m", str(gguf), "-np", str(parallel), "-t", str(threads), "-tb", str(threads),
           "-c", str(parallel * ctx_per_slot), "--cache-ram", str(cache_ram_mib), "--host", "127.0.0.1",
           "--port", str(port), "--no-webui"]
    with log.open("w") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    _live.add(process)
    server = LlamaServer(url=f"http://127.0.0.1:{port}", process=process, log=log)
    try:
        _wait_healthy(server, startup_timeout_s)
        yield server
    finally:
        server.peak_rss_bytes = server.peak_rss()
        _stop(process)
    log.unlink(missing_ok=True)  # reached only when nothing raised
