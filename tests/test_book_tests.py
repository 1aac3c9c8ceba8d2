"""The book's own test files (``llms_from_scratch/tests``), run with gptfast's modules in place of the
book's: ``sys.modules["llms_from_scratch.X"]`` is ``gptfast.book.X`` while a file is imported and run.

Nothing reaches the network: every URL the tests or the download functions open is served from a local
file (the book's data sets, and a small synthetic SMS Spam Collection for chapter 6 and appendix E).
The book's chapter-6 and appendix-E tests assert losses measured on the real UCI data; on the local
data the rule is that each gives the same result with gptfast's objects as with the book's, and that
the loss lists agree.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import io
import itertools
import os
import random
import shutil
import sys
import types
import urllib.parse
import urllib.request
import zipfile

import pytest
import torch

book = pytest.importorskip("llms_from_scratch", reason="the book's package is not installed: "
                           "pip install --no-deps llms-from-scratch==1.0.19 (and pandas, psutil)")
pytest.importorskip("pandas", reason="the book's chapter-6 code needs pandas: pip install pandas")

BOOK_TESTS = os.path.join(os.path.dirname(book.__file__), "tests")
MODULES = ["ch02", "ch03", "ch04", "ch05", "ch06", "ch07", "appendix_a", "appendix_d", "appendix_e",
           "kv_cache.gpt2", "kv_cache.generate"]
TRAINING = ("train_model_simple", "train_model", "train_classifier_simple")


def synthetic_spam_zip(path):
    """A zip holding ``SMSSpamCollection`` (label TAB text), 80 ham and 40 spam messages, as UCI's."""
    rng = random.Random(0)
    ham_words = "see you at home later tonight ok thanks call me when you get there lunch tomorrow".split()
    spam_words = "win free cash prize now claim urgent txt reply stop award guaranteed call".split()
    lines = []
    for label, words, n in (("ham", ham_words, 80), ("spam", spam_words, 40)):
        for _ in range(n):
            lines.append(f"{label}\t{' '.join(rng.choice(words) for _ in range(rng.randint(3, 14)))}")
    rng.shuffle(lines)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("SMSSpamCollection", "\n".join(lines) + "\n")
        z.writestr("readme", "synthetic stand-in for the UCI SMS Spam Collection\n")
    return path


@pytest.fixture(scope="module")
def local_files(shared_data, tmp_path_factory):
    """URL basename -> local file, for every file the book's tests download."""
    folder = tmp_path_factory.mktemp("book-files")
    files = {"the-verdict.txt": shared_data / "the-verdict.txt",
             "instruction-data.json": shared_data / "instruction-data.json",
             "sms+spam+collection.zip": synthetic_spam_zip(folder / "sms+spam+collection.zip")}
    files["sms%2Bspam%2Bcollection.zip"] = files["sms+spam+collection.zip"]
    return files


@contextlib.contextmanager
def served_from(files):
    """urllib.request.urlopen/urlretrieve answer from ``files``; any other URL is refused."""
    def path_of(url):
        url = url.full_url if isinstance(url, urllib.request.Request) else url
        name = os.path.basename(urllib.parse.urlparse(url).path)
        if name not in files:
            raise urllib.error.URLError(f"no local copy of {url} (the tests never use the network)")
        return files[name]

    def urlopen(url, *args, **kwargs):
        data = path_of(url).read_bytes()
        response = io.BytesIO(data)
        response.headers = {"Content-Length": str(len(data))}
        return response

    def urlretrieve(url, filename, *args, **kwargs):
        shutil.copyfile(path_of(url), filename)
        return filename, None

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(urllib.request, "urlopen", urlopen)
        mp.setattr(urllib.request, "urlretrieve", urlretrieve)
        yield


def proxy(module, record):
    """A copy of ``module`` whose training loops append what they return to ``record``."""
    copy = types.ModuleType(module.__name__)
    copy.__dict__.update(module.__dict__)
    for name in TRAINING:
        if name in copy.__dict__:
            def recorded(*args, _fn=copy.__dict__[name], **kwargs):
                out = _fn(*args, **kwargs)
                record.append(out)
                return out
            copy.__dict__[name] = recorded
    return copy


def run_book_test(file, func_name, params, tmp_path, impl, files):
    """Import the book's test ``file`` with ``impl`` ("gptfast" or "book") behind the book's module
    names and call ``func_name(**params)``. Returns (outcome, what the training loops returned)."""
    record = []
    real = {m: importlib.import_module(f"llms_from_scratch.{m}") for m in MODULES}
    ours = {m: importlib.import_module(f"gptfast.book.{m}") for m in MODULES} if impl == "gptfast" else real
    patched = {f"llms_from_scratch.{m}": proxy(ours[m], record) for m in MODULES}
    name = f"_book_test_{impl}_{os.path.splitext(file)[0]}"
    workdir = tmp_path / f"cwd-{impl}"
    workdir.mkdir()
    with pytest.MonkeyPatch.context() as mp, served_from(files):
        for key, mod in patched.items():
            mp.setitem(sys.modules, key, mod)
        mp.chdir(workdir)  # test_ch02 reads and writes the-verdict.txt in the current folder
        spec = importlib.util.spec_from_file_location(name, os.path.join(BOOK_TESTS, file))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        func = getattr(module, func_name)
        kwargs = dict(params)
        if "tmp_path" in inspect.signature(func).parameters:
            kwargs["tmp_path"] = tmp_path / f"tmp-{impl}"
            kwargs["tmp_path"].mkdir()
        try:
            func(**kwargs)
            outcome = "passed"
        except AssertionError as e:
            outcome = f"failed: {e}"
    return outcome, record


def collect():
    """(file, test function, parameters) for every test in the book's chapter and appendix test files."""
    files = ["test_ch02.py", "test_ch03.py", "test_ch04.py", "test_ch05.py", "test_ch06.py", "test_ch07.py",
             "test_appendix_a.py", "test_appendix_d.py", "test_appendix_e.py", "test_generate.py"]
    cases = []
    for file in files:
        source = open(os.path.join(BOOK_TESTS, file)).read()
        # parametrize marks are read after import, in the test itself; here only the names are listed
        for line in source.splitlines():
            if line.startswith("def test_"):
                cases.append((file, line[4:line.index("(")]))
    return cases


def expand(file, func_name):
    """Import the test file against the book's modules to read its parametrize marks."""
    spec = importlib.util.spec_from_file_location(f"_book_marks_{file[:-3]}", os.path.join(BOOK_TESTS, file))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    marks = [m for m in getattr(getattr(module, func_name), "pytestmark", []) if m.name == "parametrize"]
    axes = []
    for m in marks:
        names = [n.strip() for n in m.args[0].split(",")]
        axes.append([dict(zip(names, v if len(names) > 1 else (v,))) for v in m.args[1]])
    combos = [dict(kv for d in combo for kv in d.items()) for combo in itertools.product(*axes)] or [{}]
    return combos


# Tests whose assertions hold numbers measured on the book's real data; elsewhere the data is the same.
DATA_DEPENDENT = {"test_ch06.py", "test_appendix_e.py"}
CASES = collect()


def _swap_book_classes(params, impl):
    """Parametrized classes and functions come from the book's modules; map them to ours by name."""
    if impl != "gptfast":
        return params
    out = {}
    for k, v in params.items():
        module = getattr(v, "__module__", "") or ""
        if module.startswith("llms_from_scratch."):
            ours = importlib.import_module("gptfast.book." + module[len("llms_from_scratch."):])
            v = getattr(ours, v.__name__, v)
        out[k] = v
    return out


@pytest.mark.parametrize("file,func_name", CASES, ids=[f"{f[:-3]}::{n}" for f, n in CASES])
def test_the_books_test_with_gptfast(file, func_name, tmp_path, local_files):
    for i, params in enumerate(expand(file, func_name)):
        ours_params = _swap_book_classes(params, "gptfast")
        case = tmp_path / f"case{i}"
        case.mkdir()
        outcome, ours = run_book_test(file, func_name, ours_params, case, "gptfast", local_files)
        if file not in DATA_DEPENDENT:
            assert outcome == "passed", f"{file}::{func_name}{params}: {outcome}"
            continue
        torch.manual_seed(0)
        book_outcome, theirs = run_book_test(file, func_name, params, case, "book", local_files)
        assert outcome.split(":")[0] == book_outcome.split(":")[0], (outcome, book_outcome)
        assert len(ours) == len(theirs) == 1
        for name, a, b in zip(("train_losses", "val_losses", "train_accs", "val_accs", "examples_seen"),
                              ours[0], theirs[0]):
            assert a == pytest.approx(b, rel=1e-5, abs=1e-6), name
