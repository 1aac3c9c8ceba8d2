// gptfast's byte-pair-encoding core: plain C++17, no Python.
//
// * `split_gpt2`   -- a hand-written splitter for the GPT-2 pattern
//                     's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//                     (linear time, no backtracking, Unicode 16.0 classes).
// * `Encoder`      -- byte-level BPE with a rank table: each piece is merged by repeatedly joining the
//                     adjacent pair whose concatenation has the lowest rank (leftmost on ties).
// * `train_bpe`    -- learns merges from a corpus with incremental pair counts.
//
// All text given to the core is UTF-8. Invalid UTF-8 never crashes anything: a stray byte counts
// as one character of class OTHER.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace gptfast {

using Rank = uint32_t;
constexpr Rank kNoRank = 0xFFFFFFFFu;

enum CharClass : uint8_t { kOther = 0, kLetter = 1, kNumber = 2, kSpace = 3 };

// Class of the code point `cp` (cp < 0x110000).
CharClass char_class(uint32_t cp);

// Length in bytes of the piece of `text` that starts at byte `pos` (pos < text.size()).
size_t gpt2_piece_end(std::string_view text, size_t pos);

// Calls `fn(begin, end)` for every piece of `text`, in order.
template <class F>
inline void split_gpt2(std::string_view text, F&& fn) {
    size_t pos = 0;
    while (pos < text.size()) {
        size_t end = gpt2_piece_end(text, pos);
        fn(pos, end);
        pos = end;
    }
}

// A malformed ranks file: `line` is 1-based.
struct ParseError : std::runtime_error {
    size_t line;
    ParseError(size_t line_, const std::string& what) : std::runtime_error(what), line(line_) {}
};

// An id that has no token.
struct UnknownToken : std::runtime_error {
    uint64_t id;
    explicit UnknownToken(uint64_t id_) : std::runtime_error("unknown token id"), id(id_) {}
};

// Bad arguments (duplicate ids, a special token that is also ordinary text, ...).
struct InvalidArgument : std::invalid_argument {
    using std::invalid_argument::invalid_argument;
};

// Open-addressing hash table from byte strings to ranks.
class RankTable {
  public:
    void build(const std::vector<std::pair<std::string, Rank>>& items);
    Rank find(const uint8_t* p, size_t n) const;
    // find() with the key's head and hash precomputed (see key_hash).
    Rank find_hashed(const uint8_t* p, size_t n, uint64_t head, uint64_t hash) const;
    void prefetch(uint64_t hash) const {
        __builtin_prefetch(&tags_[hash & mask_]);
        __builtin_prefetch(&slots_[hash & mask_]);
    }
    static uint64_t key_head(const uint8_t* p, size_t n);
    static uint64_t key_hash(const uint8_t* p, size_t n, uint64_t head);
    Rank find(std::string_view s) const { return find(reinterpret_cast<const uint8_t*>(s.data()), s.size()); }
    size_t size() const { return count_; }
    size_t max_len() const { return max_len_; }

  private:
    struct Slot {
        uint64_t head;  // the first (up to) 8 bytes, zero-padded
        uint32_t len;   // 0 marks an empty slot
        Rank rank;
        uint32_t offset;  // of the bytes in arena_
    };
    // One byte a slot, read before the slot itself: 0 where the slot is empty, else 0x80 | the top 7
    // bits of the key's hash. Most lookups while merging are of pairs that are no token, and their
    // answer is then found in this small array (a 16-byte group at a time) without a slot read.
    // The first 16 tags are repeated past the end, so a group never wraps.
    std::vector<uint8_t> tags_;
    std::vector<Slot> slots_;
    std::string arena_;
    uint64_t mask_ = 0;
    size_t count_ = 0;
    size_t max_len_ = 0;
};

class Encoder {
  public:
    // `ranks`: token bytes -> rank (the rank is the token id); `specials`: text -> id.
    Encoder(std::vector<std::pair<std::string, Rank>> ranks, std::vector<std::pair<std::string, Rank>> specials);

    // Parses the ".tiktoken" format: one "<base64 bytes> <rank>" per line. Throws ParseError.
    static std::vector<std::pair<std::string, Rank>> parse_tiktoken(std::string_view contents);
    // The same format, ordered by rank.
    std::string to_tiktoken() const;

    // Encodes without looking for special tokens.
    void encode_ordinary(std::string_view text, std::vector<Rank>& out) const;
    // The same into `dst`, which has room for text.size() + kOutSlack ids (a piece of n bytes is
    // at most n tokens; the slack lets cached tokens be copied in fixed-size moves). Returns the
    // number of ids written.
    static constexpr size_t kOutSlack = 16;
    size_t encode_ordinary_into(std::string_view text, Rank* dst) const;
    // Encodes, turning occurrences of the special tokens with `allowed[i]` true (i indexes
    // `specials()`) into their ids.
    void encode(std::string_view text, const std::vector<bool>& allowed, std::vector<Rank>& out) const;
    // Encodes each text on `num_threads` worker threads while the calling thread hands finished
    // results over in order: `consume(begin, end, out)` gets each run of texts [begin, end) done so far
    // (out[i] for each) as soon as it is ready, so converting them overlaps the encoding.
    void encode_batch_each(const std::vector<std::string_view>& texts, const std::vector<bool>* allowed,
                           int num_threads,
                           const std::function<void(size_t, size_t, std::vector<std::vector<Rank>>&)>& consume) const;
    // BPE of a single piece (no splitting), appended to `out`.
    void encode_piece(const uint8_t* p, size_t n, std::vector<Rank>& out) const;
    // Number of tokens of encode_ordinary (through a vector; the bindings' count_ordinary, which
    // times the core alone, encodes into a buffer as encode_to_numpy does).
    size_t count_ordinary(std::string_view text) const;

    // Decodes the ids id_at(0), ..., id_at(n - 1) (each a uint64_t) from the front into `dst` while
    // they fit in `room` bytes with kDecodeSlack to spare (short tokens are copied with fixed
    // 16-byte moves). Returns the number of bytes written and sets `*done` to the number of ids
    // decoded, which is less than n where the room ran out or at the first id of n_vocab() or
    // more (the caller tells these apart by that id). Throws UnknownToken for an id below
    // n_vocab() that has no token. `id_at` is inlined into the loop, so a caller that reads ids
    // from its own layout (Python ints, strided arrays) converts them on the fly, with no copy,
    // and can send anything it cannot convert quickly as a large number to handle it itself.
    static constexpr size_t kDecodeSlack = 16;
    template <class IdAt>
    size_t decode_ids(const IdAt& id_at, size_t n, char* dst, size_t room, size_t* done) const;
    size_t max_token_len() const { return max_token_len_; }
    std::string token_bytes(uint64_t id) const;  // throws UnknownToken

    Rank rank_of(std::string_view bytes) const { return table_.find(bytes); }
    size_t n_vocab() const { return n_vocab_; }             // max id + 1
    size_t n_ranks() const { return table_.size(); }        // ordinary tokens
    const std::vector<std::pair<std::string, Rank>>& specials() const { return specials_; }
    // A piece of at least twice `long_piece_segment()` bytes is cut into segments encoded on up
    // to `long_piece_threads()` threads at once (1: never), then joined exactly (backtrack.cpp).
    // Process-wide settings; a thread encoding for encode_batch_each never cuts. The thread count
    // also caps the parts one long sequence of ids is decoded in (bindings.cpp).
    static void set_long_piece_threads(unsigned threads);
    static unsigned long_piece_threads();
    static void set_long_piece_segment(size_t min_bytes);
    // The per-thread cache of short pieces that are several tokens (bpe.cpp): its number of
    // two-entry sets (rounded up to a power of two; process-wide, taken by each thread at its next
    // encode) and the bytes it takes on each thread that encodes (128 a set).
    static void set_piece_cache_sets(size_t sets);
    static size_t piece_cache_sets();
    static size_t piece_cache_bytes();
    static size_t long_piece_segment();
    // How pieces longer than 128 bytes are encoded: "backtrack" or "merge" (see backtrack.cpp).
    const char* long_piece_method() const;
    // Checks the long-piece walk's table of which pairs of number tokens (ASCII digits only) are
    // valid against its pair check, one pair at a time: returns the pairs that differ, and sets
    // `pairs` to how many were compared. For tests.
    size_t check_number_pairs(size_t* pairs) const;

  private:
    void encode_hashed(const uint8_t* p, size_t n, uint64_t head, uint64_t hash, std::vector<Rank>& out) const;
    void bpe_small(const uint8_t* p, size_t n, std::vector<Rank>& out) const;
    // A piece of up to 128 bytes, through the cache's third level (bpe.cpp's LongCache), with its hash.
    void encode_long(const uint8_t* p, size_t n, uint64_t hash, std::vector<Rank>& out) const;
    // The same into `out` (room for n ids); returns the number of ids.
    size_t merge_small(const uint8_t* p, size_t n, Rank* out) const;
    // The same for a piece of up to 15 bytes, given its key (`key[0, 2)`: its bytes, zero-padded to 15,
    // then its length; bpe.cpp's small_key).
    size_t merge_short(const uint8_t* p, size_t n, const uint64_t* key, Rank* out) const;
    // A piece of up to 15 bytes that the first level of the cache does not hold (bpe.cpp).
    // `caches`: the calling thread's two cache levels (bpe.cpp's Caches), looked up once per call
    // of the encoder rather than once per piece.
    size_t encode_small_miss(const uint8_t* p, size_t n, uint64_t k0, uint64_t k1, void* bucket, const void* caches,
                             Rank* o) const;
    size_t encode_small_far(const uint8_t* p, size_t n, const uint64_t* key, const void* caches, Rank* o) const;
    void bpe_large(const uint8_t* p, size_t n, std::vector<Rank>& out) const;   // dispatches to one of:
    void bpe_heap(const uint8_t* p, size_t n, std::vector<Rank>& out) const;    // the merge rule, O(n log n)
    // Left to right with backtracking, in near-linear time and cache order (backtrack.cpp).
    // Returns false, doing nothing, when the vocabulary lacks the property it relies on.
    bool bpe_backtrack(const uint8_t* p, size_t n, std::vector<Rank>& out) const;
    // The canonical split of a token: the two tokens the merge rule joins last when it encodes the
    // token's bytes alone (false for single bytes and for tokens the rule never produces).
    bool split_of(Rank id, Rank* left, Rank* right) const;
    struct LongTables;  // backtrack.cpp; built on first use
    const LongTables* long_tables() const;
    struct LongSlot {
        std::once_flag once;
        std::unique_ptr<LongTables> tables;
        std::atomic<bool> ready{false};  // tables is built
        LongSlot();
        ~LongSlot();
    };
    std::unique_ptr<LongSlot> long_ = std::make_unique<LongSlot>();

    Rank find(const uint8_t* p, size_t n) const {  // rank of p[0, n), with shortcuts for 1 and 2 bytes
        if (n == 2) return pair2_[size_t(p[0]) << 8 | p[1]];
        if (n == 1) return byte_rank_[p[0]];
        if (n > table_.max_len()) return kNoRank;
        return table_.find(p, n);
    }

    RankTable table_;
    Rank byte_rank_[256];
    std::vector<Rank> pair2_;  // rank of every 2-byte string (kNoRank where none)
    std::vector<std::pair<std::string, Rank>> specials_;
    // decoder: id -> bytes [off, off + len) of dec_arena_ (len 0xFFFFFFFF: no such token)
    struct Span {
        uint32_t off, len;
    };
    static constexpr uint32_t kNoToken = 0xFFFFFFFFu;  // the len of an id with no token
    std::vector<Span> dec_;
    std::string dec_arena_;
    // The same for decoding fast: tokens of up to 12 bytes inline, so one 16-byte load gets them.
    struct alignas(16) Inline {
        char bytes[12];
        uint32_t len;  // > 12: look in dec_
    };
    std::vector<Inline> inline_;
    size_t copy_token(uint64_t id, char* dst) const;  // any token's bytes; throws UnknownToken
    size_t n_vocab_ = 0;
    size_t max_token_len_ = 0;
    uint64_t uid_ = 0;  // distinguishes encoders in per-thread caches (addresses can be reused)
};

// Kept out of line: inlined into a large caller, its loop would keep its pointers on the stack.
#if defined(__GNUC__)
#define GPTFAST_NOINLINE __attribute__((noinline))
#elif defined(_MSC_VER)
#define GPTFAST_NOINLINE __declspec(noinline)
#else
#define GPTFAST_NOINLINE
#endif

template <class IdAt>
GPTFAST_NOINLINE size_t Encoder::decode_ids(const IdAt& id_at, size_t n, char* dst, size_t room,
                                            size_t* done) const {
    // A local copy: the char stores below cannot alias it, so what it captures stays in registers
    // (captures should be by value for the same reason).
    const IdAt get = id_at;
    const Inline* inl = inline_.data();
    const uint64_t nv = n_vocab_;
    const size_t per = max_token_len_ + kDecodeSlack;  // the most one token can write
    char* d = dst;
    char* const end = dst + room;
    size_t i = 0;
    while (i < n) {
        // A group of ids that fits in the room left whatever their lengths, so the loop checks no room.
        const size_t group = std::min(size_t(end - d) / per, n - i);
        if (group == 0) break;
        for (const size_t stop = i + group; i < stop; ++i) {
            const uint64_t id = get(i);
            if (id >= nv) {
                n = i;  // stop here
                break;
            }
            const uint32_t len = inl[id].len;
            if (len <= sizeof(Inline::bytes)) {
                // One 16-byte move; the bytes past len are overwritten by the next token or trimmed.
#if defined(__GNUC__)
                typedef char V16 __attribute__((vector_size(16), aligned(1)));
                V16 v;
                std::memcpy(&v, &inl[id], 16);
                std::memcpy(d, &v, 16);
#else
                std::memcpy(d, &inl[id], 16);
#endif
                d += len;
            } else {
                d += copy_token(id, d);
            }
        }
    }
    // The tail, token by token, for when the room left is less than one worst-case token.
    for (; i < n; ++i) {
        const uint64_t id = get(i);
        if (id >= nv) break;
        if (dec_[id].len == kNoToken) throw UnknownToken(id);
        if (size_t(end - d) < dec_[id].len + kDecodeSlack) break;
        d += copy_token(id, d);
    }
    *done = i;
    return size_t(d - dst);
}

// Set on threads that encode_batch_each runs: they are already one per core, so pieces are never
// cut across more threads from there.
extern thread_local bool t_batch_worker;

// Counts of distinct pieces of a corpus (the input of the trainer).
struct PieceCounts {
    std::vector<std::string> pieces;
    std::vector<uint64_t> counts;
};

// Splits `texts` with the GPT-2 pattern, cutting out every occurrence of `specials` first, and
// counts each distinct piece. Sorted by piece bytes, so the result does not depend on threads.
PieceCounts count_pieces(const std::vector<std::string_view>& texts, const std::vector<std::string>& specials,
                         int num_threads);

// Learns up to `num_merges` merges. The result lists the new tokens' bytes in rank order
// (ranks 256, 257, ...; ranks 0..255 are the single bytes). Each step merges the pair with the
// highest count; ties go to the smallest (bytes(left), bytes(right)). A pair whose bytes already
// form a token is merged into that token without taking a new rank. Stops early when no pair is
// left. `progress(done)` is called now and then.
std::vector<std::string> train_bpe(const PieceCounts& corpus, size_t num_merges,
                                   const std::function<void(size_t)>& progress);

}  // namespace gptfast
