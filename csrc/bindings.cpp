// Python bindings of the BPE core: type conversion and GIL release only; the logic is in bpe.cpp.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <type_traits>
#include <vector>

#include "bpe.h"

#ifdef __linux__
#include <sys/mman.h>
#endif

#if PY_VERSION_HEX < 0x030B0000 && !defined(PYPY_VERSION)
#include <longintrepr.h>  // PyLongObject's digits (Python.h includes it from 3.11 on)
#endif

namespace py = pybind11;
using gptfast::Encoder;
using gptfast::Rank;

// How a one-digit int is laid out, where we can build our own: 1 for CPython 3.8-3.11 (ob_size is
// the digit count), 2 for 3.12 on (lv_tag holds the digit count and the sign).
#if !defined(PYPY_VERSION) && !defined(Py_DEBUG) && !defined(Py_TRACE_REFS) && !defined(Py_GIL_DISABLED) && \
    PYLONG_BITS_IN_DIGIT == 30
#if PY_VERSION_HEX >= 0x03080000 && PY_VERSION_HEX < 0x030C0000
#define GPTFAST_CONTIGUOUS_INTS 1
#elif PY_VERSION_HEX >= 0x030C0000 && defined(_PyLong_NON_SIZE_BITS)
#define GPTFAST_CONTIGUOUS_INTS 2
#endif
#endif

namespace {

// The ids 0..n-1 as Python ints. Where the int layout allows (CPython 3.8 on, the usual builds),
// they live in one contiguous block, so decoding can turn a list item back into an id from its
// address alone, without reading the int object. Each int is checked through Python's own API
// after it is built; on any surprise the block is dropped for ordinary ints. The block holds one
// reference to each int for as long as it lives, and is freed only if no other reference is left
// (otherwise it is kept, never dangling).
class IntTable {
  public:
    explicit IntTable(size_t n) : n_(n) {
#ifdef GPTFAST_CONTIGUOUS_INTS
        if constexpr (sizeof(PyLongObject) == 32) {
            if (n < (size_t(1) << 30)) build_block();
            if (block_) return;
        }
#endif
        for (size_t i = 0; i < n; ++i) {
            PyObject* o = PyLong_FromSize_t(i);
            if (!o) throw py::error_already_set();
            ptrs_.push_back(o);
        }
    }
    ~IntTable() {
        if (!block_) {
            for (PyObject* o : ptrs_) Py_DECREF(o);
            return;
        }
        for (PyObject* o : ptrs_)
            if (Py_REFCNT(o) != 1) return;  // still referenced from Python: keep the block
        std::free(block_);
    }
    IntTable(const IntTable&) = delete;
    IntTable& operator=(const IntTable&) = delete;

    PyObject* const* data() const { return ptrs_.data(); }
    size_t size() const { return n_; }
    py::object get(size_t i) const { return py::reinterpret_borrow<py::object>(ptrs_[i]); }
    // Our own ints are block_count() objects of 32 bytes from base() (none where the layout differs).
    uintptr_t base() const { return reinterpret_cast<uintptr_t>(block_); }
    uint64_t block_count() const { return block_ ? n_ : 0; }

  private:
#ifdef GPTFAST_CONTIGUOUS_INTS
    void build_block() {
        block_ = static_cast<char*>(std::calloc(n_ ? n_ : 1, 32));
        if (!block_) return;
        for (size_t i = 0; i < n_; ++i) {
            auto* o = reinterpret_cast<PyLongObject*>(block_ + 32 * i);
#if GPTFAST_CONTIGUOUS_INTS == 1
            PyObject_InitVar(reinterpret_cast<PyVarObject*>(o), &PyLong_Type, i == 0 ? 0 : 1);
            o->ob_digit[0] = digit(i);
#else
            PyObject_Init(reinterpret_cast<PyObject*>(o), &PyLong_Type);
            // Zero (sign 1, no digits), or one digit with sign 0 (positive).
            o->long_value.lv_tag = i == 0 ? 1 : uintptr_t(1) << _PyLong_NON_SIZE_BITS;
            o->long_value.ob_digit[0] = digit(i);
#endif
            ptrs_.push_back(reinterpret_cast<PyObject*>(o));
        }
        for (size_t i = 0; i < n_; ++i) {
            const Py_ssize_t v = PyLong_AsSsize_t(ptrs_[i]);
            if (v != Py_ssize_t(i) || Py_REFCNT(ptrs_[i]) != 1) {
                PyErr_Clear();
                ptrs_.clear();
                std::free(block_);  // nothing else has seen these ints yet
                block_ = nullptr;
                return;
            }
        }
    }
#endif

    size_t n_;
    char* block_ = nullptr;
    std::vector<PyObject*> ptrs_;
};

// str -> UTF-8 view (the str keeps the bytes alive). Surrogates raise UnicodeEncodeError,
// which the Python class handles; anything but str raises TypeError.
std::string_view utf8_of(PyObject* obj) {
    if (!PyUnicode_Check(obj))
        throw py::type_error(std::string("expected str, got ") + Py_TYPE(obj)->tp_name);
    Py_ssize_t n;
    const char* p = PyUnicode_AsUTF8AndSize(obj, &n);
    if (!p) throw py::error_already_set();
    return std::string_view(p, size_t(n));
}

std::vector<bool> allowed_mask(const py::object& allowed) {
    std::vector<bool> out;
    if (allowed.is_none()) return out;
    for (auto item : allowed) out.push_back(item.cast<bool>());
    return out;
}

// An exact int small enough to be read without calling Python (all ids below 2**30 are), or
// kNotPlain for anything else. Calls no Python code, so a list being read cannot change meanwhile.
constexpr uint64_t kNotPlain = ~uint64_t(0);
inline uint64_t plain_id(PyObject* o) {
#if PY_VERSION_HEX >= 0x030C0000
    if (PyLong_CheckExact(o) && PyUnstable_Long_IsCompact(reinterpret_cast<PyLongObject*>(o))) {
        const Py_ssize_t c = PyUnstable_Long_CompactValue(reinterpret_cast<PyLongObject*>(o));
        if (c >= 0) return uint64_t(c);
    }
#elif !defined(PYPY_VERSION)
    if (PyLong_CheckExact(o)) {  // one 30-bit digit: read it directly
        const Py_ssize_t size = Py_SIZE(o);
        if (size == 1) return reinterpret_cast<PyLongObject*>(o)->ob_digit[0];
        if (size == 0) return 0;
    }
#endif
    return kNotPlain;
}

// Any object -> token id, with the errors Python's own conversions give (OverflowError for
// negative ids and ids of 2**32 or more). May call the object's __index__.
inline Rank checked_id_of(PyObject* o) {
    const uint64_t plain = plain_id(o);
    if (plain <= 0xFFFFFFFFull) return Rank(plain);
    unsigned long v;
    if (PyLong_CheckExact(o)) {
        v = PyLong_AsUnsignedLong(o);
    } else {
        PyObject* idx = PyNumber_Index(o);
        if (!idx) throw py::error_already_set();
        v = PyLong_AsUnsignedLong(idx);
        Py_DECREF(idx);
    }
    if (v == (unsigned long)-1 && PyErr_Occurred()) throw py::error_already_set();
    if (v > 0xFFFFFFFFul) {
        PyErr_SetString(PyExc_OverflowError, "token id does not fit in 32 bits");
        throw py::error_already_set();
    }
    return Rank(v);
}

// The index of `o` in a table of 32-byte ints at `base`: offset / 32 when the offset is a multiple
// of 32, else a huge number. Rotating right by 5 folds both tests into one comparison.
inline uint64_t own_index(PyObject* o, uintptr_t base) {
    const uint64_t d = uint64_t(reinterpret_cast<uintptr_t>(o) - base);
    return (d >> 5) | (d << 59);
}

// A sequence of ids, held as a list or tuple (PySequence_Fast) for the duration.
struct IdSequence {
    PyObject* seq;
    explicit IdSequence(const py::handle& tokens) {
        seq = PySequence_Fast(tokens.ptr(), "expected a sequence of token ids");
        if (!seq) throw py::error_already_set();
    }
    ~IdSequence() { Py_DECREF(seq); }
    size_t size() const { return size_t(PySequence_Fast_GET_SIZE(seq)); }
    PyObject** items() const { return PySequence_Fast_ITEMS(seq); }
};

// Decodes id_at(0), ..., id_at(n - 1) onto the end of `buf` (tail(), room(), advance(k) and
// reserve(more)), growing it as needed. Returns how many were decoded: all of them, or those
// before the first id of n_vocab or more.
template <class IdAt, class Buf>
size_t decode_onto(const Encoder& enc, const IdAt& id_at, size_t n, Buf& buf) {
    constexpr size_t kSlack = Encoder::kDecodeSlack;
    size_t at = 0;
    for (;;) {
        size_t done = 0;
        buf.advance(enc.decode_ids([id_at, at](size_t i) { return id_at(at + i); }, n - at, buf.tail(), buf.room(),
                                   &done));
        at += done;
        if (at == n || id_at(at) >= enc.n_vocab()) return at;
        // Room for the next 64 ids at their worst, or half as much again.
        buf.reserve(std::min(n - at, size_t(64)) * (enc.max_token_len() + kSlack) + kSlack);
    }
}

// A bytes object filled by appending decoded blocks; grown geometrically, trimmed at the end.
class OutBytes {
  public:
    explicit OutBytes(size_t guess) {
        cap_ = guess + kSlack;
        obj_ = PyBytes_FromStringAndSize(nullptr, Py_ssize_t(cap_));
        if (!obj_) throw py::error_already_set();
        advise_huge();
    }
    ~OutBytes() { Py_XDECREF(obj_); }
    OutBytes(const OutBytes&) = delete;
    OutBytes& operator=(const OutBytes&) = delete;

    // Decodes id_at(0), ..., id_at(n - 1), growing the bytes object as needed. Returns how many were
    // decoded: all of them, or those before the first id of n_vocab or more. A long sequence is
    // split into parts decoded at the same time (see append_parts); the result is the same.
    template <class IdAt>
    size_t append(const Encoder& enc, const IdAt& id_at, size_t n) {
        const size_t parts = std::min<size_t>(Encoder::long_piece_threads(), n / kMinPart);
        return parts > 1 ? append_parts(enc, id_at, n, parts) : decode_onto(enc, id_at, n, *this);
    }
    py::bytes finish() {
        if (_PyBytes_Resize(&obj_, Py_ssize_t(len_)) != 0) throw py::error_already_set();
        PyObject* o = obj_;
        obj_ = nullptr;
        return py::reinterpret_steal<py::bytes>(o);
    }

  private:
    // Ids per thread, at least: about a millisecond of decoding, against a thread's start.
    static constexpr size_t kMinPart = size_t(1) << 19;

    // Part 0 is decoded here, into the bytes object; each other part on a thread of its own, into a
    // buffer of its own, copied in after. Then the parts are taken in order, exactly as one pass
    // would meet them: a part that stopped early (an id of n_vocab or more) ends the result there,
    // and one that threw rethrows, but only once every part before it is complete. The id readers
    // only read memory (no Python calls, no reference counts) and the caller holds the GIL
    // throughout, so nothing they read can change meanwhile.
    template <class IdAt>
    size_t append_parts(const Encoder& enc, const IdAt& id_at, size_t n, size_t parts) {
        struct Part {
            std::unique_ptr<char[]> bytes;  // not zeroed: only the first len bytes are read
            size_t cap = 0, len = 0, done = 0;
            std::exception_ptr error;
            char* tail() { return bytes.get() + len; }
            size_t room() const { return cap - len; }
            void advance(size_t k) { len += k; }
            void reserve(size_t more) {  // as OutBytes::reserve
                if (cap - len >= more) return;
                const size_t to = std::max(cap + cap / 2, len + more);
                std::unique_ptr<char[]> grown(new char[to]);
                if (len) std::memcpy(grown.get(), bytes.get(), len);
                bytes = std::move(grown);
                cap = to;
            }
        };
        std::vector<size_t> cut(parts + 1);
        for (size_t k = 0; k <= parts; ++k) cut[k] = n / parts * k;
        cut[parts] = n;
        std::vector<Part> part(parts);
        auto decode_part = [&](size_t k) {
            Part& p = part[k];
            try {
                const size_t from = cut[k], count = cut[k + 1] - from;
                p.reserve(count * 3 + kSlack);
                p.done = decode_onto(enc, [id_at, from](size_t i) { return id_at(from + i); }, count, p);
            } catch (...) {
                p.error = std::current_exception();
            }
        };
        std::vector<std::thread> threads;
        std::vector<size_t> here;  // parts no thread could be started for
        for (size_t k = 1; k < parts; ++k) {
            try {
                threads.emplace_back(decode_part, k);
            } catch (const std::system_error&) {
                here.push_back(k);
            }
        }
        size_t at = 0;
        std::exception_ptr first_error;
        try {
            at = decode_onto(enc, id_at, cut[1], *this);
        } catch (...) {
            first_error = std::current_exception();
        }
        for (const size_t k : here) decode_part(k);
        for (auto& th : threads) th.join();
        if (first_error) std::rethrow_exception(first_error);
        for (size_t k = 1; k < parts && at == cut[k]; ++k) {
            Part& p = part[k];
            if (p.error) std::rethrow_exception(p.error);
            reserve(p.len + kSlack);
            std::memcpy(tail(), p.bytes.get(), p.len);
            advance(p.len);
            at += p.done;
            p.bytes.reset();
        }
        return at;
    }

    template <class IdAt, class Buf>
    friend size_t decode_onto(const Encoder&, const IdAt&, size_t, Buf&);
    char* tail() { return PyBytes_AS_STRING(obj_) + len_; }
    size_t room() const { return cap_ - len_; }
    void advance(size_t k) { len_ += k; }

    // Room for `more` bytes after what is written, or half the capacity again, whichever is more.
    void reserve(size_t more) {
        if (cap_ - len_ >= more) return;
        cap_ = std::max(cap_ + cap_ / 2, len_ + more);
        if (_PyBytes_Resize(&obj_, Py_ssize_t(cap_)) != 0) throw py::error_already_set();
        advise_huge();
    }

    // Large outputs are fresh memory from the kernel, and faulting it in 4 KB pages costs about as
    // much as decoding into it: ask for huge pages where the kernel leaves that to the program.
    void advise_huge() const {
#ifdef __linux__
        constexpr uintptr_t kHuge = uintptr_t(2) << 20;
        if (cap_ < 4 * kHuge) return;
        const uintptr_t lo = (reinterpret_cast<uintptr_t>(PyBytes_AS_STRING(obj_)) + kHuge - 1) & ~(kHuge - 1);
        const uintptr_t hi = (reinterpret_cast<uintptr_t>(PyBytes_AS_STRING(obj_)) + cap_) & ~(kHuge - 1);
        if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // a hint; failure is harmless
#endif
    }

    static constexpr size_t kSlack = Encoder::kDecodeSlack;
    PyObject* obj_ = nullptr;
    size_t cap_ = 0, len_ = 0;
};

// Room for the ids of a text of `bytes` bytes (Encoder::encode_ordinary_into), from malloc, not
// zeroed: pages the ids never reach are never touched.
struct IdBuffer {
    Rank* ids;
    size_t n = 0;  // ids written
    explicit IdBuffer(size_t bytes) {
        ids = static_cast<Rank*>(std::malloc((bytes + Encoder::kOutSlack) * sizeof(Rank)));
        if (!ids) throw std::bad_alloc();
    }
    ~IdBuffer() { std::free(ids); }
    IdBuffer(const IdBuffer&) = delete;
    IdBuffer& operator=(const IdBuffer&) = delete;
    // The buffer cut to the n ids (the caller frees it).
    Rank* release_trimmed() {
        Rank* p = static_cast<Rank*>(std::realloc(ids, std::max<size_t>(n, 1) * sizeof(Rank)));
        if (!p) p = ids;  // a failed shrink leaves the block as it was
        ids = nullptr;
        return p;
    }
};

class PyEncoder {
  public:
    explicit PyEncoder(std::unique_ptr<Encoder> enc) : enc_(std::move(enc)) {
        ints_ = std::make_unique<IntTable>(enc_->n_vocab());
    }

    static std::unique_ptr<PyEncoder> from_ranks(const std::vector<std::pair<py::bytes, Rank>>& ranks,
                                                 const std::vector<std::pair<std::string, Rank>>& specials) {
        std::vector<std::pair<std::string, Rank>> r;
        r.reserve(ranks.size());
        for (auto& kv : ranks) r.emplace_back(std::string(kv.first), kv.second);
        return std::make_unique<PyEncoder>(std::make_unique<Encoder>(std::move(r), specials));
    }

    static std::unique_ptr<PyEncoder> from_tiktoken(const py::bytes& contents,
                                                    const std::vector<std::pair<std::string, Rank>>& specials) {
        std::string_view view = contents;
        std::unique_ptr<Encoder> enc;
        {
            py::gil_scoped_release nogil;
            enc = std::make_unique<Encoder>(Encoder::parse_tiktoken(view), specials);
        }
        return std::make_unique<PyEncoder>(std::move(enc));
    }

    // ids -> list of the prebuilt ints. For longer lists the references are added per distinct id
    // instead of one Py_INCREF per element, which would touch a scattered int object for every token:
    // one pass counts each id (in a table the thread keeps, all zero between calls) as it fills the
    // list, noting each id the first time it is counted (without a branch), and a second goes over
    // the distinct ids alone, adding each one's count to its int and zeroing the count again.
    py::list to_list(const std::vector<Rank>& ids) const { return to_list(ids.data(), ids.size()); }
    py::list to_list(const Rank* ids, const size_t n) const {
        PyObject* list = PyList_New(Py_ssize_t(n));
        if (!list) throw py::error_already_set();
        PyObject* const* table = ints_->data();
        PyObject** items = reinterpret_cast<PyListObject*>(list)->ob_item;
#if defined(Py_GIL_DISABLED)
        const bool bulk = false;
#else
        const bool bulk = n >= 1024;
#endif
        if (!bulk) {
            for (size_t i = 0; i < n; ++i) {
                PyObject* o = table[ids[i]];
                Py_INCREF(o);
                items[i] = o;
            }
            return py::reinterpret_steal<py::list>(list);
        }
        thread_local std::vector<uint32_t> count, seen;
        if (count.size() < ints_->size()) {
            count.assign(ints_->size(), 0);
            seen.assign(ints_->size() + 1, 0);  // (one past: written, not counted, once all are seen)
        }
        uint32_t* c = count.data();
        uint32_t* d = seen.data();
        size_t distinct = 0;
        // (each slot of `seen` is written; it advances only past an id counted for the first time)
        if (const uintptr_t base = ints_->base()) {  // one block of 32-byte ints: no table to read
            for (size_t i = 0; i < n; ++i) {
                const Rank id = ids[i];
                const uint32_t k = c[id];
                d[distinct] = id;
                distinct += k == 0;
                c[id] = k + 1;
                items[i] = reinterpret_cast<PyObject*>(base + (uintptr_t(id) << 5));
            }
        } else {
            for (size_t i = 0; i < n; ++i) {
                const Rank id = ids[i];
                const uint32_t k = c[id];
                d[distinct] = id;
                distinct += k == 0;
                c[id] = k + 1;
                items[i] = table[id];
            }
        }
        for (size_t j = 0; j < distinct; ++j) {
            const Rank id = d[j];
            const uint32_t k = c[id];
            c[id] = 0;
            PyObject* o = table[id];
#if PY_VERSION_HEX >= 0x030C0000
            if (_Py_IsImmortal(o)) continue;
#endif
            Py_SET_REFCNT(o, Py_REFCNT(o) + Py_ssize_t(k));
        }
        return py::reinterpret_steal<py::list>(list);
    }

    // The ids of `s` into a buffer the thread keeps (so that a call does not map and fault in fresh
    // pages for them); a buffer grown past kKeepMax ids is freed by the caller's KeepTrim.
    // Returns the buffer and sets *n to the ids written.
    static constexpr size_t kKeepMax = size_t(16) << 20;
    struct KeepTrim {
        ~KeepTrim() {
            if (keep_cap() > kKeepMax) {
                keep().reset();
                keep_cap() = 0;
            }
        }
    };
    static std::unique_ptr<Rank[]>& keep() {
        thread_local std::unique_ptr<Rank[]> b;
        return b;
    }
    static size_t& keep_cap() {
        thread_local size_t cap = 0;
        return cap;
    }
    const Rank* encode_kept(std::string_view s, size_t* n) const {
        std::unique_ptr<Rank[]>& buf = keep();
        size_t& cap = keep_cap();
        const size_t need = s.size() + Encoder::kOutSlack;
        if (need > cap) {
            buf.reset();
            cap = 0;
            buf.reset(new Rank[std::max(need, size_t(1) << 16)]);
            cap = std::max(need, size_t(1) << 16);
        }
        py::gil_scoped_release nogil;
        *n = enc_->encode_ordinary_into(s, buf.get());
        return buf.get();
    }

    py::list encode_ordinary(const py::handle& text) const { return ordinary_list(utf8_of(text.ptr())); }

    // The ids of `s`, special tokens as ordinary text, as a list.
    py::list ordinary_list(std::string_view s) const {
        KeepTrim after;
        size_t n;
        const Rank* ids = encode_kept(s, &n);
        return to_list(ids, n);
    }

    py::list encode(const py::handle& text, const py::object& allowed) const {
        std::string_view s = utf8_of(text.ptr());
        std::vector<bool> mask = allowed_mask(allowed);
        std::vector<Rank> out;
        {
            py::gil_scoped_release nogil;
            enc_->encode(s, mask, out);
        }
        return to_list(out);
    }

    // Whether `s` holds the text of any special token (which encode, by default, refuses).
    bool holds_special(std::string_view s) const {
        for (const auto& sp : enc_->specials())
            if (s.find(sp.first) != std::string_view::npos) return true;
        return false;
    }

    // encode(text) with its defaults (no special token allowed, all of them refused), for the
    // Python class's quick path: the ids, or None where the text holds a special token (the
    // caller then takes its full path, which raises the error).
    py::object encode_plain(const py::handle& text) const {
        std::string_view s = utf8_of(text.ptr());
        if (holds_special(s)) return py::none();
        return ordinary_list(s);
    }
    py::object encode_to_numpy_plain(const py::handle& text) const {
        std::string_view s = utf8_of(text.ptr());
        if (holds_special(s)) return py::none();
        return ordinary_array(s);
    }

    // The ids of `s`, special tokens as ordinary text, as a numpy array. A text that the thread's
    // kept buffer holds is encoded there and copied into a block of the ids' own size (a quarter of
    // the worst case, one id a byte, which would often be fresh pages to fault in); a longer one
    // goes straight into a worst-case block, trimmed after.
    py::array_t<uint32_t> ordinary_array(std::string_view s) const {
        if (s.size() + Encoder::kOutSlack <= kKeepMax) {
            KeepTrim after;
            size_t n;
            const Rank* ids = encode_kept(s, &n);
            Rank* data = static_cast<Rank*>(std::malloc(std::max<size_t>(n, 1) * sizeof(Rank)));
            if (!data) throw std::bad_alloc();
            std::memcpy(data, ids, n * sizeof(Rank));
            py::capsule owner(data, [](void* p) { std::free(p); });
            return py::array_t<uint32_t>({py::ssize_t(n)}, {py::ssize_t(sizeof(Rank))}, data, owner);
        }
        IdBuffer buf(s.size());
        {
            py::gil_scoped_release nogil;
            buf.n = enc_->encode_ordinary_into(s, buf.ids);
        }
        Rank* data = buf.release_trimmed();
        py::capsule owner(data, [](void* p) { std::free(p); });
        return py::array_t<uint32_t>({py::ssize_t(buf.n)}, {py::ssize_t(sizeof(Rank))}, data, owner);
    }

    py::array_t<uint32_t> encode_to_numpy(const py::handle& text, const py::object& allowed) const {
        std::string_view s = utf8_of(text.ptr());
        std::vector<bool> mask = allowed_mask(allowed);
        if (std::find(mask.begin(), mask.end(), true) == mask.end()) return ordinary_array(s);  // none to look for
        auto* out = new std::vector<Rank>();
        {
            py::gil_scoped_release nogil;
            enc_->encode(s, mask, *out);
        }
        py::capsule owner(out, [](void* p) { delete static_cast<std::vector<Rank>*>(p); });
        return py::array_t<uint32_t>({py::ssize_t(out->size())}, {py::ssize_t(sizeof(Rank))}, out->data(), owner);
    }

    // Lists are built on this thread, holding the GIL, while the worker threads go on encoding.
    py::list encode_batch(const py::list& list, const py::object& allowed, int num_threads) const {
        // A tuple of the texts keeps each one alive while the GIL is released, whatever other
        // threads do to the list meanwhile.
        const py::tuple texts = py::reinterpret_steal<py::tuple>(PySequence_Tuple(list.ptr()));
        if (!texts) throw py::error_already_set();
        std::vector<std::string_view> views;
        views.reserve(texts.size());
        for (auto t : texts) views.push_back(utf8_of(t.ptr()));
        std::vector<bool> mask = allowed_mask(allowed);
        py::list result(views.size());
        {
            py::gil_scoped_release nogil;
            enc_->encode_batch_each(views, allowed.is_none() ? nullptr : &mask, num_threads,
                                    [&](size_t begin, size_t end, std::vector<std::vector<Rank>>& out) {
                                        py::gil_scoped_acquire gil;
                                        for (size_t i = begin; i < end; ++i) {
                                            result[i] = to_list(out[i]);
                                            std::vector<Rank>().swap(out[i]);
                                        }
                                    });
        }
        return result;
    }

    size_t count_ordinary(const py::handle& text) const {  // as encode_to_numpy, without the array
        std::string_view s = utf8_of(text.ptr());
        IdBuffer buf(s.size());
        py::gil_scoped_release nogil;
        return enc_->encode_ordinary_into(s, buf.ids);
    }

    py::list encode_single_piece(const py::bytes& piece) const {
        std::string_view s = piece;
        std::vector<Rank> out;
        enc_->encode_piece(reinterpret_cast<const uint8_t*>(s.data()), s.size(), out);
        return to_list(out);
    }

    // One pass over the ids, converted as they are decoded, into a bytes object that grows as needed.
    // Errors come as tiktoken, which converts every id before decoding any, gives them: an id that
    // cannot be converted (TypeError, OverflowError) wins over an unknown one (KeyError) anywhere.
    py::bytes decode_bytes(const py::handle& tokens) const {
        if (!PyList_Check(tokens.ptr()) && !PyTuple_Check(tokens.ptr()) && PyObject_CheckBuffer(tokens.ptr())) {
            py::bytes out;
            if (decode_buffer(tokens, &out)) return out;
        }
        IdSequence seq(tokens);
        const size_t n = seq.size();
        PyObject* const* items = seq.items();
        OutBytes out(n * 3);
        size_t at = 0;
        try {
            // Our own ints are known from their address alone, and small exact ints are read; these
            // loops call no Python code. Anything else comes out as n_vocab or more and ends them.
            if (ints_->block_count())
                at = out.append(*enc_, [items, base = ints_->base()](size_t i) { return own_index(items[i], base); }, n);
            if (at < n)
                at += out.append(*enc_, [rest = items + at](size_t i) { return plain_id(rest[i]); }, n - at);
        } catch (const gptfast::UnknownToken&) {
            convert_from(seq.seq, at);  // raises the first conversion error, if any
            throw;
        }
        if (at == n) return out.finish();
        // The rest is converted whole first, as tiktoken does.
        const std::vector<Rank> rest = convert_from(seq.seq, at);
        const size_t got = out.append(*enc_, [ids = rest.data()](size_t i) { return uint64_t(ids[i]); }, rest.size());
        if (got < rest.size()) throw gptfast::UnknownToken(rest[got]);
        return out.finish();
    }

    // The ids of seq[from:]; raises the first conversion error. Converting may call an object's
    // __index__, which may change the list: like Python's own iteration (and tiktoken), this reads
    // the list as it is at each step, holding a reference to the item being converted.
    static std::vector<Rank> convert_from(PyObject* seq, size_t from) {
        std::vector<Rank> ids;
        for (Py_ssize_t i = Py_ssize_t(from); i < PySequence_Fast_GET_SIZE(seq); ++i) {
            const py::object item = py::reinterpret_borrow<py::object>(PySequence_Fast_GET_ITEM(seq, i));
            ids.push_back(checked_id_of(item.ptr()));
        }
        return ids;
    }

    // A 1-D buffer of integers (numpy arrays, array.array, memoryview) of any width and stride, in
    // native or explicit byte order, is read in place. Returns false for any other buffer, which is
    // then read as a sequence.
    bool decode_buffer(const py::handle& tokens, py::bytes* result) const {
        Py_buffer view;
        if (PyObject_GetBuffer(tokens.ptr(), &view, PyBUF_RECORDS_RO) != 0) {
            PyErr_Clear();
            return false;
        }
        struct Release {
            Py_buffer* v;
            ~Release() { PyBuffer_Release(v); }
        } release{&view};
        if (view.ndim != 1) return false;
        const char* fmt = view.format ? view.format : "B";
        const uint16_t probe = 1;
        const bool little = *reinterpret_cast<const uint8_t*>(&probe) == 1;
        if (*fmt == '@' || *fmt == '=' || (*fmt == '<' && little) || (*fmt == '>' && !little)) ++fmt;
        const char kind = fmt[0];
        if (kind == '\0' || fmt[1] != '\0' || !std::strchr("bBhHiIlLqQnN", kind)) return false;
        const bool is_signed = std::islower(static_cast<unsigned char>(kind)) != 0;
        const size_t n = size_t(view.shape ? view.shape[0] : view.len / view.itemsize);
        const char* base = static_cast<const char*>(view.buf);
        const Py_ssize_t stride = view.strides ? view.strides[0] : view.itemsize;
        OutBytes out(n * 3);
        // One loop per element type. A negative id comes out as 2**64 - |id|, which like any id of
        // n_vocab or more ends the loop; what it was is sorted out after.
        auto run = [&](auto zero) {
            using T = decltype(zero);
            auto value_at = [base, stride](size_t i) {
                T v;
                std::memcpy(&v, base + Py_ssize_t(i) * stride, sizeof v);
                return v;
            };
            auto convertible = [](T v) { return !(std::is_signed<T>::value && v < T(0)) && uint64_t(v) <= 0xFFFFFFFFull; };
            try {
                const size_t at = out.append(*enc_, [value_at](size_t i) { return uint64_t(value_at(i)); }, n);
                if (at < n) throw gptfast::UnknownToken(uint64_t(value_at(at)));
            } catch (const gptfast::UnknownToken&) {
                for (size_t i = 0; i < n; ++i)
                    if (!convertible(value_at(i))) {
                        PyErr_SetString(PyExc_OverflowError, "token id does not fit in 32 bits");
                        throw py::error_already_set();
                    }
                throw;
            }
        };
        switch (size_t(view.itemsize) * 2 + (is_signed ? 1 : 0)) {
            case 2: run(uint8_t(0)); break;
            case 3: run(int8_t(0)); break;
            case 4: run(uint16_t(0)); break;
            case 5: run(int16_t(0)); break;
            case 8: run(uint32_t(0)); break;
            case 9: run(int32_t(0)); break;
            case 16: run(uint64_t(0)); break;
            case 17: run(int64_t(0)); break;
            default: return false;
        }
        *result = out.finish();
        return true;
    }

    py::bytes token_bytes(const py::handle& id) const {
        PyObject* idx = PyNumber_Index(id.ptr());
        if (!idx) throw py::error_already_set();
        int overflow = 0;
        long long v = PyLong_AsLongLongAndOverflow(idx, &overflow);
        Py_DECREF(idx);
        if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
        if (overflow || v < 0) throw gptfast::UnknownToken(overflow ? ~0ull : uint64_t(-1));
        std::string b = enc_->token_bytes(uint64_t(v));
        return py::bytes(b);
    }

    py::object rank_of(const py::bytes& b) const {
        Rank r = enc_->rank_of(std::string_view(b));
        if (r == gptfast::kNoRank) return py::none();
        return ints_->get(r);
    }

    py::dict mergeable_ranks() const {
        py::dict d;
        std::vector<bool> special(enc_->n_vocab(), false);
        for (auto& kv : enc_->specials()) special[kv.second] = true;
        for (size_t id = 0; id < enc_->n_vocab(); ++id) {
            if (special[id]) continue;
            try {
                d[py::bytes(enc_->token_bytes(id))] = ints_->get(id);
            } catch (gptfast::UnknownToken&) {
            }
        }
        return d;
    }

    py::bytes to_tiktoken() const { return py::bytes(enc_->to_tiktoken()); }
    std::string long_piece_method() const { return enc_->long_piece_method(); }
    std::pair<size_t, size_t> check_number_pairs() const {
        size_t pairs = 0;
        const size_t wrong = enc_->check_number_pairs(&pairs);
        return {pairs, wrong};
    }
    size_t n_vocab() const { return enc_->n_vocab(); }
    size_t n_ranks() const { return enc_->n_ranks(); }
    std::vector<std::pair<std::string, Rank>> specials() const { return enc_->specials(); }

  private:
    std::unique_ptr<Encoder> enc_;
    std::unique_ptr<IntTable> ints_;
};

py::list split_gpt2(const py::handle& text) {
    std::string_view s = utf8_of(text.ptr());
    py::list out;
    gptfast::split_gpt2(s, [&](size_t b, size_t e) { out.append(py::bytes(s.data() + b, e - b)); });
    return out;
}

py::tuple train(const py::list& texts, const std::vector<std::string>& specials, size_t num_merges, int num_threads,
                const py::object& progress) {
    std::vector<std::string_view> views;
    views.reserve(texts.size());
    for (auto t : texts) views.push_back(utf8_of(t.ptr()));
    std::function<void(size_t)> cb;
    if (!progress.is_none())
        cb = [&progress](size_t done) {
            py::gil_scoped_acquire gil;
            progress(done);
        };
    std::vector<std::string> merges;
    size_t distinct = 0;
    {
        py::gil_scoped_release nogil;
        gptfast::PieceCounts counts = gptfast::count_pieces(views, specials, num_threads);
        distinct = counts.pieces.size();
        merges = gptfast::train_bpe(counts, num_merges, cb);
    }
    py::list out;
    for (auto& m : merges) out.append(py::bytes(m));
    return py::make_tuple(out, distinct);
}

}  // namespace

PYBIND11_MODULE(_bpe, m) {
    m.doc() = "The C++ core of gptfast.Tokenizer (use gptfast.Tokenizer, not this module).";

    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const gptfast::UnknownToken& e) {
            std::string msg = e.id == ~0ull ? std::string("token id out of range")
                                            : "Invalid token for decoding: " + std::to_string(e.id);
            PyErr_SetObject(PyExc_KeyError, py::str(msg).ptr());
        } catch (const gptfast::ParseError& e) {
            PyErr_SetString(PyExc_ValueError, ("line " + std::to_string(e.line) + ": " + e.what()).c_str());
        } catch (const gptfast::InvalidArgument& e) {
            PyErr_SetString(PyExc_ValueError, e.what());
        }
    });

    py::class_<PyEncoder>(m, "Encoder")
        .def_static("from_ranks", &PyEncoder::from_ranks, py::arg("ranks"), py::arg("specials"))
        .def_static("from_tiktoken", &PyEncoder::from_tiktoken, py::arg("contents"), py::arg("specials"))
        .def("encode_ordinary", &PyEncoder::encode_ordinary)
        .def("encode", &PyEncoder::encode, py::arg("text"), py::arg("allowed"))
        .def("encode_to_numpy", &PyEncoder::encode_to_numpy, py::arg("text"), py::arg("allowed"))
        .def("encode_plain", &PyEncoder::encode_plain, py::arg("text"))
        .def("encode_to_numpy_plain", &PyEncoder::encode_to_numpy_plain, py::arg("text"))
        .def("encode_batch", &PyEncoder::encode_batch, py::arg("texts"), py::arg("allowed"), py::arg("num_threads"))
        .def("count_ordinary", &PyEncoder::count_ordinary)
        .def("encode_single_piece", &PyEncoder::encode_single_piece)
        .def("decode_bytes", &PyEncoder::decode_bytes)
        .def("token_bytes", &PyEncoder::token_bytes)
        .def("rank_of", &PyEncoder::rank_of)
        .def("mergeable_ranks", &PyEncoder::mergeable_ranks)
        .def("to_tiktoken", &PyEncoder::to_tiktoken)
        .def_property_readonly("long_piece_method", &PyEncoder::long_piece_method)
        .def("_check_number_pairs", &PyEncoder::check_number_pairs,
             "(pairs compared, pairs that differ): the walk's number-pair table against its pair check.")
        .def_property_readonly("n_vocab", &PyEncoder::n_vocab)
        .def_property_readonly("n_ranks", &PyEncoder::n_ranks)
        .def_property_readonly("specials", &PyEncoder::specials);

    m.def("set_long_piece_threads", &Encoder::set_long_piece_threads, py::arg("threads"),
          "How many threads one long piece may be encoded on (1: only the calling thread).");
    m.def("long_piece_threads", &Encoder::long_piece_threads);
    m.def("_set_long_piece_segment", &Encoder::set_long_piece_segment, py::arg("min_bytes"),
          "The least bytes a thread is given of one long piece (small values are for tests).");
    m.def("_long_piece_segment", &Encoder::long_piece_segment);
    m.def("_set_piece_cache_sets", &Encoder::set_piece_cache_sets, py::arg("sets"),
          "The size of each thread's cache of pieces, in two-entry sets (small values are for tests).");
    m.def("_piece_cache_sets", &Encoder::piece_cache_sets);
    m.def("piece_cache_bytes", &Encoder::piece_cache_bytes,
          "Bytes of the cache of pieces, on each thread that encodes (a fixed bound, whatever the text).");
    m.def("split_gpt2", &split_gpt2, "The pieces of a str under the GPT-2 pattern, as UTF-8 bytes.");
    m.def("train", &train, py::arg("texts"), py::arg("specials"), py::arg("num_merges"), py::arg("num_threads"),
          py::arg("progress"));
    m.attr("UNICODE_VERSION") = "16.0.0";
}
