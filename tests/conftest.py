"""Test setup shared by every test module.

* With no CUDA GPU, ``TRITON_INTERPRET=1`` is set *before* anything imports triton, so kernel tests
  (which ask for ``backend="triton"`` by name) run through Triton's CPU interpreter, while model tests
  on ``"auto"`` run the reference at full speed.
* ``shared_data`` finds the book's small data sets: ``$GPTFAST_TEST_DATA`` or ``../shared/data`` beside
  the repository; tests that need them skip with a reason when they are absent.
* ``TIKTOKEN_CACHE_DIR`` is pointed at a cache found there (a copy, so tiktoken never writes into it),
  letting ``tiktoken.get_encoding("gpt2")`` work offline; with no cache and no network, tiktoken's
  encoder is built over the ranks the package ships instead (see ``_tiktoken_gpt2_offline``).
* The top-level name ``kernels`` is the installed distribution of that name where there is one:
  transformers 5.25 and later depend on Hugging Face's ``kernels`` package and import it, and with
  the repository's root on ``sys.path`` (``python -m pytest``) this checkout's ``kernels/`` folder
  (installed as ``gptfast.kernels``) would be found first.
"""

import importlib.abc
import importlib.metadata
import importlib.util
import os
import pathlib
import shutil
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parent.parent


class _InstalledKernelsFirst(importlib.abc.MetaPathFinder):
    """Finds the top-level ``kernels`` in its installed distribution, not in the checkout's root."""

    def find_spec(self, name, path, target=None):
        if name != "kernels":
            return None
        try:
            init = pathlib.Path(importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py"))
        except importlib.metadata.PackageNotFoundError:
            return None
        if not init.is_file() or init.parent == REPO / "kernels":
            return None
        return importlib.util.spec_from_file_location("kernels", init, submodule_search_locations=[str(init.parent)])


sys.meta_path.insert(0, _InstalledKernelsFirst())


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


HAS_CUDA = _has_cuda()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _find_data_dir():
    env = os.environ.get("GPTFAST_TEST_DATA")
    for cand in ([env] if env else []) + [str(REPO.parent / "shared" / "data")]:
        if cand and os.path.isdir(cand):
            return pathlib.Path(cand)
    return None


DATA_DIR = _find_data_dir()

if "TIKTOKEN_CACHE_DIR" in os.environ or (DATA_DIR is not None and (DATA_DIR / "tiktoken-cache").is_dir()):
    src = pathlib.Path(os.environ.get("TIKTOKEN_CACHE_DIR") or DATA_DIR / "tiktoken-cache")
    if src.is_dir():
        _cache = tempfile.mkdtemp(prefix="gptfast-tiktoken-cache-")
        shutil.copytree(src, _cache, dirs_exist_ok=True)
        os.environ["TIKTOKEN_CACHE_DIR"] = _cache


def _tiktoken_gpt2_offline() -> None:
    """Make ``tiktoken.get_encoding("gpt2")`` work on a machine with neither network nor tiktoken cache.

    tiktoken (the oracle) normally downloads GPT-2's files or reads its cache. When it cannot, its own
    ``Encoding`` is built over the r50k_base ranks gptfast ships (OpenAI's file, the sha256 tiktoken
    itself checks for r50k_base) and registered under "gpt2", so the oracle is still tiktoken's
    encoder; ``GPTFAST_TIKTOKEN_FROM_PACKAGE=1`` then tells tests that compare the two loads to skip.
    """
    try:
        import tiktoken
        import tiktoken.registry
    except ImportError:
        return
    try:
        tiktoken.get_encoding("gpt2")
    except Exception:
        from gptfast.tokenizer import tiktoken_gpt2

        tiktoken.registry.ENCODINGS["gpt2"] = tiktoken_gpt2()
        os.environ["GPTFAST_TIKTOKEN_FROM_PACKAGE"] = "1"


_tiktoken_gpt2_offline()

import pytest  # noqa: E402

# Under pytest-xdist each worker gets its share of the cores: torch's default of one thread per core in
# every worker oversubscribes the machine and stalls small models badly.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data():
    """Path of the book's data sets; skips the test when they are not available."""
    if DATA_DIR is None:
        pytest.skip(reason="the book's data sets are not available: set GPTFAST_TEST_DATA to a folder holding them")
    return DATA_DIR


@pytest.fixture(scope="session")
def gpt2_files(shared_data):
    d = shared_data / "gpt2"
    if not (d / "encoder.json").is_file():
        pytest.skip(reason=f"GPT-2's encoder.json/vocab.bpe are not in {d}")
    return d


@pytest.fixture(scope="module")
def enc():
    """tiktoken's GPT-2 encoding, the tokenizer tests' oracle."""
    tiktoken = pytest.importorskip("tiktoken")
    return tiktoken.get_encoding("gpt2")


@pytest.fixture(scope="module")
def fast():
    """gptfast's GPT-2 tokenizer on the C++ core."""
    from gptfast.tokenizer import Tokenizer

    return Tokenizer.gpt2(impl="fast")


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: tiny models are fastest that way, and two OpenMP threads stall
    badly when the cores are shared."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
