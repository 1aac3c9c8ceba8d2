"""Test setup shared by every test module.

* With no CUDA GPU, ``TRITON_INTERPRET=1`` is set *before* anything imports triton, so kernel tests
  (which ask for ``backend="triton"`` by name) run through Triton's CPU interpreter, while model tests
  on ``"auto"`` run the reference at full speed.
* ``shared_data`` finds the book's small data sets: ``$GPTFAST_TEST_DATA`` or ``../shared/data`` beside
  the repository; tests that need them skip with a reason when they are absent.
* ``TIKTOKEN_CACHE_DIR`` is pointed at a cache found there (a copy, so tiktoken never writes into it),
  letting ``tiktoken.get_encoding("gpt2")`` work offline.
"""

import os
import pathlib
import shutil
import tempfile

REPO = pathlib.Path(__file__).resolve().parent.parent


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


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: tiny models are fastest that way, and two OpenMP threads stall
    badly when the cores are shared."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
