// gptfast's byte-pair-encoding core (see bpe.h).
#include "bpe.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <cstring>
#include <functional>
#include <mutex>
#include <queue>
#include <thread>
#include <type_traits>
#include <unordered_map>

#ifdef __linux__
#include <sys/mman.h>
#endif
#ifdef __unix__
#include <pthread.h>
#endif

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "unicode_tables.h"

namespace gptfast {

// ---------------------------------------------------------------------------------------------
// Character classes and the GPT-2 splitter
// ---------------------------------------------------------------------------------------------

CharClass char_class(uint32_t cp) {
    if (cp >= 0x110000) return kOther;
    return static_cast<CharClass>(unicode::kStage2[unicode::kStage1[cp >> 8]][cp & 0xFF]);
}

namespace {

struct AsciiClasses {
    uint8_t cls[128];
    AsciiClasses() {
        for (uint32_t c = 0; c < 128; ++c) cls[c] = char_class(c);
    }
};
const AsciiClasses kAscii;

inline bool is_cont(uint8_t b) { return (b & 0xC0) == 0x80; }

// Class of the character at s[i] (i < n); its length in bytes goes to *len.
inline CharClass class_at(const uint8_t* s, size_t n, size_t i, size_t* len) {
    uint8_t c = s[i];
    if (c < 0x80) {
        *len = 1;
        return static_cast<CharClass>(kAscii.cls[c]);
    }
    uint32_t cp;
    if (c >= 0xC2 && c < 0xE0 && i + 1 < n && is_cont(s[i + 1])) {
        *len = 2;
        cp = (uint32_t(c & 0x1F) << 6) | (s[i + 1] & 0x3F);
    } else if (c >= 0xE0 && c < 0xF0 && i + 2 < n && is_cont(s[i + 1]) && is_cont(s[i + 2])) {
        *len = 3;
        cp = (uint32_t(c & 0x0F) << 12) | (uint32_t(s[i + 1] & 0x3F) << 6) | (s[i + 2] & 0x3F);
    } else if (c >= 0xF0 && c < 0xF5 && i + 3 < n && is_cont(s[i + 1]) && is_cont(s[i + 2]) && is_cont(s[i + 3])) {
        *len = 4;
        cp = (uint32_t(c & 0x07) << 18) | (uint32_t(s[i + 1] & 0x3F) << 12) | (uint32_t(s[i + 2] & 0x3F) << 6) |
             (s[i + 3] & 0x3F);
    } else {
        *len = 1;  // not UTF-8: one byte of class OTHER
        return kOther;
    }
    return char_class(cp);
}

// End of the run of characters of class `cls` that starts at i.
inline size_t run_end(const uint8_t* s, size_t n, size_t i, CharClass cls) {
    while (i < n) {
        uint8_t b = s[i];
        if (b < 0x80) {
            if (kAscii.cls[b] != cls) break;
            ++i;
        } else {
            size_t len;
            if (class_at(s, n, i, &len) != cls) break;
            i += len;
        }
    }
    return i;
}

}  // namespace

namespace {
// The class of every byte for the ASCII fast path: an ASCII byte's class, and kNonAscii for the
// lead and continuation bytes of longer characters (and stray bytes), which the general path reads.
constexpr uint8_t kNonAscii = 4;
struct ByteClasses {
    uint8_t cls[256];
    ByteClasses() {
        for (uint32_t c = 0; c < 256; ++c) cls[c] = c < 128 ? kAscii.cls[c] : kNonAscii;
    }
};
const ByteClasses kBytes;

// The end of a run of class `k` (a letter, number or other run) from i, ASCII first; at the first
// byte of a longer character the general loop takes over.
// Letters and digits are scanned 8 bytes at a time (SWAR): a mask with the top bit of each byte that
// is an ASCII letter (digit), and the first byte that is not one found by counting zeros, so the end of
// a word costs no mispredicted loop exit.
constexpr uint64_t kHi = 0x8080808080808080ull;
constexpr uint64_t kOnes = 0x0101010101010101ull;
inline uint64_t ascii_letters(uint64_t w) {
    const uint64_t low = (w | (0x20 * kOnes)) & (0x7F * kOnes);
    return ((low | kHi) - 0x61 * kOnes) & ((0x7A | 0x80) * kOnes - low) & ~w & kHi;
}
inline uint64_t ascii_digits(uint64_t w) {
    const uint64_t low = w & (0x7F * kOnes);
    return ((low | kHi) - 0x30 * kOnes) & ((0x39 | 0x80) * kOnes - low) & ~w & kHi;
}

inline size_t ascii_run_end(const uint8_t* s, size_t n, size_t i, uint8_t k) {
    const uint8_t* cls = kBytes.cls;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    if (k == kLetter || k == kNumber) {
        while (i + 8 <= n) {
            uint64_t w;
            std::memcpy(&w, s + i, 8);
            const uint64_t stop = ~(k == kLetter ? ascii_letters(w) : ascii_digits(w)) & kHi;
            if (stop) {
                i += size_t(__builtin_ctzll(stop)) >> 3;  // little-endian: the first byte is the lowest
                goto done;
            }
            i += 8;
        }
    }
#endif
    while (i < n && cls[s[i]] == k) ++i;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
done:
#endif
    if (i < n && s[i] >= 0x80) return run_end(s, n, i, CharClass(k));
    return i;
}

// The body of gpt2_piece_end, inlined into the encoder's loop.
#if defined(__GNUC__)
__attribute__((always_inline))
#endif
inline size_t piece_end(const uint8_t* s, size_t n, size_t pos) {
    const uint8_t c = s[pos];
    // The common cases first, on ASCII: a letter or digit run, or one after a space.
    {
        const uint8_t k = kBytes.cls[c];
        if (k == kLetter || k == kNumber || (k == kOther && c != '\'')) return ascii_run_end(s, n, pos + 1, k);
        if (c == ' ' && pos + 1 < n) {
            const uint8_t k2 = kBytes.cls[s[pos + 1]];
            if (k2 == kLetter || k2 == kNumber || (k2 == kOther && s[pos + 1] != '\'')) return ascii_run_end(s, n, pos + 2, k2);
        }
    }
    // A run of ASCII whitespace followed by ASCII (or the end): see the general rule below.
    if (kBytes.cls[c] == kSpace) {
        size_t i = pos + 1;
        while (i < n && kBytes.cls[s[i]] == kSpace) ++i;
        if (i == n) return n;
        // one U+0020 before a non-space attaches to it (the general path); a longer run leaves its
        // last character to what follows, and a single other character stands alone
        if (s[i] < 0x80 && (i - 1 > pos || c != ' ')) return i - 1 > pos ? i - 1 : i;
    }
    // 's 't 're 've 'm 'll 'd  (ASCII apostrophe, lowercase only)
    if (c == '\'' && pos + 1 < n) {
        const uint8_t d = s[pos + 1];
        if (d == 's' || d == 'd' || d == 'm' || d == 't') return pos + 2;
        if (pos + 2 < n) {
            const uint8_t e = s[pos + 2];
            if ((d == 'l' && e == 'l') || (d == 'v' && e == 'e') || (d == 'r' && e == 'e')) return pos + 3;
        }
    }
    size_t len;
    const CharClass cls = class_at(s, n, pos, &len);
    // ' ?\p{L}+', ' ?\p{N}+', ' ?[^\s\p{L}\p{N}]+': only U+0020 attaches to what follows.
    if (c == ' ' && pos + 1 < n) {
        size_t len2;
        const CharClass next = class_at(s, n, pos + 1, &len2);
        if (next != kSpace) return run_end(s, n, pos + 1 + len2, next);
    }
    if (cls != kSpace) return run_end(s, n, pos + len, cls);
    // A whitespace run: whole at the end of the text ('\s+$'); otherwise it gives back its last
    // character to what follows ('\s+(?!\S)'), unless it is a single character ('\s').
    size_t last = pos;
    size_t i = pos + len;
    while (i < n) {
        size_t l;
        if (class_at(s, n, i, &l) != kSpace) break;
        last = i;
        i += l;
    }
    if (i == n) return n;
    return last > pos ? last : i;
}

// ---------------------------------------------------------------------------------------------
// The block splitter: piece boundaries of 64 bytes at a time
// ---------------------------------------------------------------------------------------------
//
// Every rule of the pattern but the contractions looks at two neighbouring characters only, so once
// each byte carries the class of its character, the starts of the pieces in a block of 64 bytes come
// out of a few bit masks (bit i for byte i) with no branch per byte:
//   * a piece starts where the class (letter, number, whitespace, other) changes, except after a
//     U+0020 space before a non-space, which joins what follows (' ?\p{L}+' and the like);
//   * a whitespace byte before a non-space starts a piece of its own: a run gives its last character
//     to what follows ('\s+(?!\S)') and a single one stands alone ('\s+'); at the end of the text the
//     whole run is one piece, so there it starts none;
//   * an apostrophe that starts a piece and is followed by s, d, m, t (ll, ve, re) is a contraction of
//     two (three) bytes: its letters start no piece and the byte after it starts one. Apostrophes are
//     rare, so each is looked at in scalar code.
// ASCII bytes get their classes from SIMD compares. In a block with longer characters, each of 2 or
// 3 bytes is looked up once, at its first byte, and its class copied to the bytes after it
// (wide_block_classes); a character may run into the next block. A block with any other byte of 0x80
// or more (a character of 4 bytes, whitespace such as U+00A0, a byte that is not UTF-8) is left to
// piece_end, piece by piece, past that byte. The masks need the class of the byte before the block
// (carried from the previous block) and up to two bytes after it; a contraction at the end of a
// block moves starts of the next one.
constexpr uint64_t kMaskSpace = 1;    // class bits of the byte before a block
constexpr uint64_t kMaskLetter = 2;
constexpr uint64_t kMaskNumber = 4;
constexpr uint64_t kMaskBlank = 8;    // U+0020

struct BlockClasses {
    uint64_t letter, number, space, blank, apos;  // bit i: byte i is a letter, digit, \s, U+0020, '
};

#if defined(__SSE2__) && !defined(GPTFAST_SWAR_SPLITTER)
// The bytes of p[0, 64) that are 0x80 or more.
inline uint64_t high_bytes(const uint8_t* p) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16));
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 32));
    const __m128i d = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 48));
    if (_mm_movemask_epi8(_mm_or_si128(_mm_or_si128(a, b), _mm_or_si128(c, d))) == 0) return 0;
    return uint64_t(uint32_t(_mm_movemask_epi8(a))) | uint64_t(uint32_t(_mm_movemask_epi8(b))) << 16 |
           uint64_t(uint32_t(_mm_movemask_epi8(c))) << 32 | uint64_t(uint32_t(_mm_movemask_epi8(d))) << 48;
}

// The first bytes of longer characters in p[0, 64): `lead` (0xC0 or more), `lead3` (0xE0 or more: 3
// bytes or more) and `bad` (0xC0, 0xC1 and 0xF0 or more: no character of 2 or 3 bytes starts so).
struct LeadBytes {
    uint64_t lead, lead3, bad;
};
inline LeadBytes lead_bytes(const uint8_t* p) {
    // signed: 0xC0..0xFF are -64..-1, 0xE0.. from -32, 0xF0.. from -16
    const __m128i z = _mm_setzero_si128(), c0 = _mm_set1_epi8(char(0xBF)), e0 = _mm_set1_epi8(char(0xDF));
    const __m128i f0 = _mm_set1_epi8(char(0xEF)), fe = _mm_set1_epi8(char(0xFE)), c0c1 = _mm_set1_epi8(char(0xC0));
    LeadBytes l{0, 0, 0};
    for (int j = 0; j < 4; ++j) {
        const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * j));
        const __m128i neg = _mm_cmplt_epi8(x, z);
        const __m128i bad = _mm_or_si128(_mm_and_si128(_mm_cmpgt_epi8(x, f0), neg),
                                         _mm_cmpeq_epi8(_mm_and_si128(x, fe), c0c1));
        const int sh = 16 * j;
        l.lead |= uint64_t(uint32_t(_mm_movemask_epi8(_mm_and_si128(_mm_cmpgt_epi8(x, c0), neg)))) << sh;
        l.lead3 |= uint64_t(uint32_t(_mm_movemask_epi8(_mm_and_si128(_mm_cmpgt_epi8(x, e0), neg)))) << sh;
        l.bad |= uint64_t(uint32_t(_mm_movemask_epi8(bad))) << sh;
    }
    return l;
}

// The classes of 64 ASCII bytes. Signed compares are exact on bytes below 0x80 (and give a byte of
// 0x80 or more no class).
inline void block_classes(const uint8_t* p, BlockClasses* k) {
    uint64_t m[5] = {0, 0, 0, 0, 0};
    const __m128i lower = _mm_set1_epi8(0x20), a1 = _mm_set1_epi8('a' - 1), z1 = _mm_set1_epi8('z' + 1);
    const __m128i d0 = _mm_set1_epi8('0' - 1), d9 = _mm_set1_epi8('9' + 1);
    const __m128i w0 = _mm_set1_epi8(0x09 - 1), w1 = _mm_set1_epi8(0x0D + 1), ap = _mm_set1_epi8('\'');
    for (int j = 0; j < 4; ++j) {
        const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * j));
        const __m128i low = _mm_or_si128(x, lower);
        const __m128i letter = _mm_and_si128(_mm_cmpgt_epi8(low, a1), _mm_cmpgt_epi8(z1, low));
        const __m128i digit = _mm_and_si128(_mm_cmpgt_epi8(x, d0), _mm_cmpgt_epi8(d9, x));
        const __m128i blank = _mm_cmpeq_epi8(x, lower);
        const __m128i space = _mm_or_si128(_mm_and_si128(_mm_cmpgt_epi8(x, w0), _mm_cmpgt_epi8(w1, x)), blank);
        const int sh = 16 * j;
        m[0] |= uint64_t(uint32_t(_mm_movemask_epi8(letter))) << sh;
        m[1] |= uint64_t(uint32_t(_mm_movemask_epi8(digit))) << sh;
        m[2] |= uint64_t(uint32_t(_mm_movemask_epi8(space))) << sh;
        m[3] |= uint64_t(uint32_t(_mm_movemask_epi8(blank))) << sh;
        m[4] |= uint64_t(uint32_t(_mm_movemask_epi8(_mm_cmpeq_epi8(x, ap)))) << sh;
    }
    *k = BlockClasses{m[0], m[1], m[2], m[3], m[4]};
}
#else
// The same 8 bytes at a time in uint64 words: a byte's flag in its top bit, then the 8 top bits of a
// word gathered into 8 bits by one multiply (each lands on its own bit of the top byte, no carries).
inline uint64_t gather_top_bits(uint64_t hi) { return ((hi >> 7) * 0x0102040810204080ull) >> 56; }
inline uint64_t load64(const uint8_t* p) {
    uint64_t w;
    std::memcpy(&w, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    w = __builtin_bswap64(w);
#endif
    return w;
}
inline uint64_t equal_bytes(uint64_t w, uint8_t c) {  // exact: no borrow from one byte into the next
    const uint64_t x = w ^ (c * kOnes);
    return ~(((x & (0x7F * kOnes)) + 0x7F * kOnes) | x | (0x7F * kOnes));
}
inline uint64_t high_bytes(const uint8_t* p) {
    uint64_t any = 0;
    for (int j = 0; j < 8; ++j) any |= load64(p + 8 * j);
    if ((any & kHi) == 0) return 0;
    uint64_t m = 0;
    for (int j = 0; j < 8; ++j) m |= gather_top_bits(load64(p + 8 * j) & kHi) << (8 * j);
    return m;
}
struct LeadBytes {
    uint64_t lead, lead3, bad;
};
inline LeadBytes lead_bytes(const uint8_t* p) {
    LeadBytes l{0, 0, 0};
    for (int j = 0; j < 8; ++j) {
        const uint64_t w = load64(p + 8 * j);
        const uint64_t two = w & (w << 1), three = two & (w << 2);  // top bit: the top 2 (3) bits set
        const uint64_t bad = (three & (w << 3)) | equal_bytes(w & (0xFE * kOnes), 0xC0);
        const int sh = 8 * j;
        l.lead |= gather_top_bits(two & kHi) << sh;
        l.lead3 |= gather_top_bits(three & kHi) << sh;
        l.bad |= gather_top_bits(bad & kHi) << sh;
    }
    return l;
}
inline void block_classes(const uint8_t* p, BlockClasses* k) {
    *k = BlockClasses{0, 0, 0, 0, 0};
    for (int j = 0; j < 8; ++j) {
        uint64_t w = load64(p + 8 * j);
        w &= ~(((w & kHi) >> 7) * 0xFF);  // a byte of 0x80 or more as 0 (no class; no borrow below)
        const uint64_t blank = equal_bytes(w, 0x20);
        const uint64_t ws = ((w | kHi) - 0x09 * kOnes) & ((0x0D | 0x80) * kOnes - w) & kHi;
        const int sh = 8 * j;
        k->letter |= gather_top_bits(ascii_letters(w)) << sh;
        k->number |= gather_top_bits(ascii_digits(w)) << sh;
        k->space |= gather_top_bits(ws | blank) << sh;
        k->blank |= gather_top_bits(blank) << sh;
        k->apos |= gather_top_bits(equal_bytes(w, '\'')) << sh;
    }
}
#endif

// The classes of a block that has bytes of 0x80 or more (`high`), where each such byte is part of a
// character of 2 or 3 bytes (as class_at reads them) that is not whitespace: each byte of a character
// gets its class. The first `pend` bytes continue the character that ends the block before, whose
// class is in `before` (kMask*); *pend_next gets how many bytes of the block's last character lie past
// it. False where the block has any other byte of 0x80 or more (a character of 4 bytes, whitespace
// such as U+00A0, a byte that is not UTF-8): those are left to piece_end. p[64, 66) must be readable.
inline bool wide_block_classes(const uint8_t* p, uint64_t high, unsigned pend, uint64_t before, BlockClasses* k,
                               unsigned* pend_next) {
    const LeadBytes l = lead_bytes(p);
    const uint64_t cont = high & ~l.lead;
    // each lead at i wants continuation bytes at i + 1 (and i + 2 for 3 bytes), and nothing else is one
    if (l.bad || cont != ((l.lead << 1) | (l.lead3 << 2) | ((uint64_t(1) << pend) - 1))) return false;
    unsigned past = 0;
    if (l.lead) {
        const unsigned last = 63 - unsigned(__builtin_clzll(l.lead));
        const unsigned end = last + 2 + unsigned(l.lead3 >> last & 1);
        past = end > 64 ? end - 64 : 0;
        if ((past >= 1 && !is_cont(p[64])) || (past == 2 && !is_cont(p[65]))) return false;
    }
    // the two bits of each lead's class (kLetter 1, kNumber 2, kSpace 3) in two masks
    static_assert(kOther == 0 && kLetter == 1 && kNumber == 2 && kSpace == 3, "class codes");
    uint64_t bit0 = 0, bit1 = 0;
    for (uint64_t m = l.lead; m; m &= m - 1) {
        const unsigned i = unsigned(__builtin_ctzll(m));
        const uint32_t c = p[i], c1 = p[i + 1] & 0x3F, c2 = p[i + 2] & 0x3F;
        const uint32_t cp = c >= 0xE0 ? (c & 0x0F) << 12 | c1 << 6 | c2 : (c & 0x1F) << 6 | c1;
        const uint64_t cls = unicode::kStage2[unicode::kStage1[cp >> 8]][cp & 0xFF];
        bit0 |= (cls & 1) << i;
        bit1 |= (cls >> 1) << i;
    }
    if (bit0 & bit1) return false;  // whitespace
    uint64_t letter = bit0, number = bit1;
    block_classes(p, k);
    letter |= k->letter;
    number |= k->number;
    const uint64_t letter_in = (before & kMaskLetter) >> 1, number_in = (before & kMaskNumber) >> 2;
    for (int r = 0; r < 2; ++r) {  // a lead's class to the (up to two) bytes after it
        letter |= (letter << 1 | letter_in) & cont;
        number |= (number << 1 | number_in) & cont;
    }
    k->letter = letter;
    k->number = number;
    *pend_next = past;
    return true;
}

// The starts of pieces in a block that are still to be returned: bit i is base + i. Kept by the
// caller, apart from the splitter, so that the two stay in registers in the caller's loop.
struct PieceStarts {
    uint64_t bits = 0;
    size_t base = 0;
};

// Splits a text into pieces, in order: next(c, pos) is the end of the piece that starts at pos, where
// pos is 0 or the end that next returned last (with the same `c`). Exactly piece_end's pieces.
class BlockSplitter {
  public:
    BlockSplitter(const uint8_t* s, size_t n) : s_(s), n_(n) {}

#if defined(__GNUC__)
    __attribute__((always_inline))
#endif
    size_t next(PieceStarts& c, size_t pos) {
        if (c.bits) {
            const size_t e = c.base + size_t(__builtin_ctzll(c.bits));
            c.bits &= c.bits - 1;
            return e;
        }
        if (pos < blocks_from_) return piece_end(s_, n_, pos);  // bytes the blocks leave to piece_end
        const size_t e = refill(pos);
        c.bits = bits_;
        c.base = base_;
        return e;
    }

  private:
    // The end of the piece at pos when the block holds no more starts and pos >= blocks_from_.
    GPTFAST_NOINLINE size_t refill(size_t pos) {
        for (;;) {
            if (chained_) {
                // pos is the last start of the block at base_: its piece runs into the next block
                const size_t b = base_ + 64;
                if (b >= n_) {
                    bits_ = 0;
                    return n_;
                }
                if (!load(b, false)) {
                    chained_ = false;
                    bits_ = 0;
                    return piece_end_at(pos);
                }
            } else if (!load(pos, true)) {
                bits_ = 0;
                return piece_end_at(pos);
            }
            if (bits_) {
                const size_t e = base_ + size_t(__builtin_ctzll(bits_));
                bits_ &= bits_ - 1;
                return e;
            }
        }
    }

    size_t piece_end_at(size_t pos) const {  // out of line, as this is once a failed block
        return gpt2_piece_end(std::string_view(reinterpret_cast<const char*>(s_), n_), pos);
    }

    // Reads the starts of the block at b into bits_: `fresh` where a piece starts at b and the
    // previous block was not read (the carried state is not used), else it follows the block at
    // base_. False, reading nothing, where the block has a byte of 0x80 or more.
    bool load(size_t b, bool fresh) {
        const uint8_t* p = s_ + b;
        uint8_t tail[64 + 16];
        const size_t left = n_ - b;
        if (left < 66) {  // the block, and two bytes past it for the contractions, padded with spaces
            std::memset(tail, ' ', sizeof tail);
            std::memcpy(tail, p, left);
            p = tail;
        }
        BlockClasses k;
        const uint64_t before = fresh ? 0 : carry_;
        unsigned pend = 0;
        if (const uint64_t high = high_bytes(p)) {
            if (!wide_block_classes(p, high, fresh ? 0 : pend_, before, &k, &pend)) {
                // Past the last such byte; in text where block after block fails, further each
                // time (up to 512 bytes), so that such text does not pay for a look every 64 bytes.
                blocks_from_ = std::max(b + 64 - size_t(__builtin_clzll(high)), b + (size_t(32) << misses_));
                misses_ += misses_ < 4;
                return false;
            }
        } else {
            block_classes(p, &k);
        }
        misses_ = 0;
        const uint64_t letter_b = k.letter << 1 | (before & kMaskLetter) >> 1;
        const uint64_t number_b = k.number << 1 | (before & kMaskNumber) >> 2;
        const uint64_t space_b = k.space << 1 | (before & kMaskSpace);
        const uint64_t blank_b = k.blank << 1 | (before & kMaskBlank) >> 3;
        // whitespace after the block: the end of the text counts as whitespace (a run there is whole)
        uint64_t space_after = 1;
        if (left > 64) {
            const uint8_t c = s_[b + 64];
            size_t len;
            space_after = (c < 0x80 ? kBytes.cls[c] : uint8_t(class_at(s_, n_, b + 64, &len))) == kSpace;
        }
        const uint64_t change = (k.letter ^ letter_b) | (k.number ^ number_b) | (k.space ^ space_b);
        uint64_t starts = change & ~(blank_b & ~k.space);
        starts |= k.space & ~(k.space >> 1 | space_after << 63);
        uint64_t set_next = 0, clear_next = 0;
        if (fresh) {
            starts |= 1;
        } else {
            starts = (starts & ~clear_) | set_;
        }
        for (uint64_t c = k.apos & starts; c; c &= c - 1) {
            const unsigned i = unsigned(__builtin_ctzll(c));
            const uint8_t d = p[i + 1], e = p[i + 2];
            unsigned len = 0;
            if (d == 's' || d == 'd' || d == 'm' || d == 't')
                len = 2;
            else if ((d == 'l' && e == 'l') || (d == 'v' && e == 'e') || (d == 'r' && e == 'e'))
                len = 3;
            if (len == 0) continue;
            for (unsigned j = i + 1; j < i + len; ++j) {
                if (j < 64)
                    starts &= ~(uint64_t(1) << j);
                else
                    clear_next |= uint64_t(1) << (j - 64);
            }
            const unsigned j = i + len;
            if (j < 64)
                starts |= uint64_t(1) << j;
            else
                set_next |= uint64_t(1) << (j - 64);
        }
        if (fresh) starts &= ~uint64_t(1);  // b itself: the piece being ended
        if (left < 64) starts &= (uint64_t(1) << left) - 1;
        set_ = set_next;
        clear_ = clear_next;
        carry_ = (k.space >> 63) * kMaskSpace | (k.letter >> 63) * kMaskLetter | (k.number >> 63) * kMaskNumber |
                 (k.blank >> 63) * kMaskBlank;
        base_ = b;
        bits_ = starts;
        pend_ = pend;
        chained_ = true;
        return true;
    }

    const uint8_t* s_;
    size_t n_;
    size_t base_ = 0;        // the block whose starts bits_ holds
    uint64_t bits_ = 0;      // what refill hands to the caller's PieceStarts (bit i: base_ + i)
    bool chained_ = false;   // the next block follows the one at base_ (its state below is valid)
    uint64_t carry_ = 0;     // classes of the last byte of the block at base_ (kMask*)
    uint64_t set_ = 0, clear_ = 0;  // starts a contraction adds to / removes from the next block
    unsigned pend_ = 0;      // bytes at the start of the next block that end the last character of this
    size_t blocks_from_ = 0;  // no block is read that starts before this (piece_end's bytes, see load)
    unsigned misses_ = 0;    // blocks in a row that piece_end had to read (at most 4)
};
}  // namespace
#define GPTFAST_BLOCK_SPLITTER 1  // tools/bpe_bench.cpp times BlockSplitter alone where this is set

size_t gpt2_piece_end(std::string_view text, size_t pos) {
    return piece_end(reinterpret_cast<const uint8_t*>(text.data()), text.size(), pos);
}

// ---------------------------------------------------------------------------------------------
// RankTable
// ---------------------------------------------------------------------------------------------

namespace {

// The first min(n, 8) bytes of p, zero-padded, without reading past p + n.
inline uint64_t load_head(const uint8_t* p, size_t n) {
    uint64_t v = 0;
    if (n >= 8) {
        std::memcpy(&v, p, 8);
    } else if (n >= 4) {
        uint32_t a, b;
        std::memcpy(&a, p, 4);
        std::memcpy(&b, p + n - 4, 4);
        v = uint64_t(a) | (uint64_t(b) << (8 * (n - 4)));
    } else if (n > 0) {
        v = uint64_t(p[0]) | (uint64_t(p[n / 2]) << (8 * (n / 2))) | (uint64_t(p[n - 1]) << (8 * (n - 1)));
    }
    return v;
}

inline uint64_t mix(uint64_t h) {
    h ^= h >> 32;
    h *= 0xD6E8FEB86659FD93ull;
    h ^= h >> 32;
    return h;
}

inline uint64_t hash_bytes(const uint8_t* p, size_t n, uint64_t head) {
    uint64_t h = (head ^ (uint64_t(n) << 56)) * 0x9E3779B97F4A7C15ull;
    for (size_t i = 8; i < n; i += 8) {
        uint64_t v = load_head(p + i, std::min<size_t>(8, n - i));
        h = (h ^ v) * 0x9E3779B97F4A7C15ull;
        h ^= h >> 29;
    }
    return mix(h);
}

// x, which the compiler may no longer see through: a choice computed as a value stays one (a select,
// not a branch), where a branch on it would be mispredicted about half the time.
inline size_t as_value(size_t x) {
#if defined(__GNUC__)
    __asm__("" : "+r"(x));
#endif
    return x;
}

// hash_bytes(p, n, load_head(p, n)) of a piece of 1 to 15 bytes, from its bytes zero-padded in two
// words (lo: bytes 0-7, hi: bytes 8-14), without a branch on its length.
inline uint64_t hash_short(uint64_t lo, uint64_t hi, size_t n) {
    const uint64_t h0 = (lo ^ (uint64_t(n) << 56)) * 0x9E3779B97F4A7C15ull;
    uint64_t h1 = (h0 ^ hi) * 0x9E3779B97F4A7C15ull;
    h1 ^= h1 >> 29;
    return mix(n > 8 ? h1 : h0);
}
}  // namespace

namespace {
inline uint8_t tag_of(uint64_t hash) { return uint8_t(0x80 | (hash >> 57)); }
}  // namespace

void RankTable::build(const std::vector<std::pair<std::string, Rank>>& items) {
    size_t cap = 16;
    while (cap < items.size() * 2 + 16) cap <<= 1;
    slots_.assign(cap, Slot{0, 0, 0, 0});
    tags_.assign(cap + 16, 0);
    mask_ = cap - 1;
    arena_.clear();
    count_ = 0;
    size_t total = 0;
    for (auto& kv : items) total += kv.first.size();
    arena_.reserve(total);
    for (auto& kv : items) {
        const std::string& s = kv.first;
        if (s.empty()) throw InvalidArgument("a token has no bytes");
        if (s.size() > 0xFFFFFF) throw InvalidArgument("a token is longer than 16 MiB");
        if (find(s) != kNoRank) throw InvalidArgument("two tokens have the same bytes");
        const uint8_t* p = reinterpret_cast<const uint8_t*>(s.data());
        uint64_t head = load_head(p, s.size());
        const uint64_t hash = hash_bytes(p, s.size(), head);
        uint64_t i = hash & mask_;
        while (slots_[i].len != 0) i = (i + 1) & mask_;
        slots_[i] = Slot{head, uint32_t(s.size()), kv.second, uint32_t(arena_.size())};
        tags_[i] = tag_of(hash);
        if (i < 16) tags_[cap + i] = tags_[i];
        arena_ += s;
        ++count_;
        max_len_ = std::max(max_len_, s.size());
    }
}

uint64_t RankTable::key_head(const uint8_t* p, size_t n) { return load_head(p, n); }
uint64_t RankTable::key_hash(const uint8_t* p, size_t n, uint64_t head) { return hash_bytes(p, n, head); }

Rank RankTable::find(const uint8_t* p, size_t n) const {
    if (count_ == 0 || n == 0) return kNoRank;
    const uint64_t head = load_head(p, n);
    return find_hashed(p, n, head, hash_bytes(p, n, head));
}

Rank RankTable::find_hashed(const uint8_t* p, size_t n, uint64_t head, uint64_t hash) const {
    if (count_ == 0 || n == 0) return kNoRank;
    const uint8_t want = tag_of(hash);
    uint64_t i = hash & mask_;
    for (;;) {
        // the slots of this group that come before its first empty one and have the key's tag
        uint32_t empty, same;
#if defined(__SSE2__)
        const __m128i g = _mm_loadu_si128(reinterpret_cast<const __m128i*>(&tags_[i]));
        empty = uint32_t(_mm_movemask_epi8(_mm_cmpeq_epi8(g, _mm_setzero_si128())));
        same = uint32_t(_mm_movemask_epi8(_mm_cmpeq_epi8(g, _mm_set1_epi8(char(want)))));
#else
        empty = same = 0;
        for (unsigned j = 0; j < 16; ++j) {
            empty |= uint32_t(tags_[i + j] == 0) << j;
            same |= uint32_t(tags_[i + j] == want) << j;
        }
#endif
        uint32_t cand = empty ? same & ((empty & (0u - empty)) - 1) : same;
        for (; cand; cand &= cand - 1) {
            const Slot& s = slots_[(i + unsigned(__builtin_ctz(cand))) & mask_];
            if (s.len == n && s.head == head &&
                (n <= 8 || std::memcmp(arena_.data() + s.offset + 8, p + 8, n - 8) == 0))
                return s.rank;
        }
        if (empty) return kNoRank;
        i = (i + 16) & mask_;
    }
}

// ---------------------------------------------------------------------------------------------
// Encoder: construction, file format
// ---------------------------------------------------------------------------------------------

namespace {
constexpr uint32_t kMissing = 0xFFFFFFFFu;  // no such node
constexpr size_t kSmallPiece = 128;  // pieces up to this many bytes use the quadratic merge loop
constexpr size_t kPad = 16;

const char kB64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

int b64_value(char c) {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
}

bool b64_decode(std::string_view in, std::string& out) {
    out.clear();
    if (in.size() % 4 != 0 || in.empty()) return false;
    for (size_t i = 0; i < in.size(); i += 4) {
        int v[4];
        int pad = 0;
        for (int k = 0; k < 4; ++k) {
            char c = in[i + k];
            if (c == '=' && i + 4 == in.size() && k >= 2) {
                v[k] = 0;
                ++pad;
            } else {
                if (pad) return false;
                v[k] = b64_value(c);
                if (v[k] < 0) return false;
            }
        }
        uint32_t w = (uint32_t(v[0]) << 18) | (uint32_t(v[1]) << 12) | (uint32_t(v[2]) << 6) | uint32_t(v[3]);
        out.push_back(char(w >> 16));
        if (pad < 2) out.push_back(char((w >> 8) & 0xFF));
        if (pad < 1) out.push_back(char(w & 0xFF));
    }
    return true;
}

void b64_encode(std::string_view in, std::string& out) {
    size_t i = 0;
    for (; i + 3 <= in.size(); i += 3) {
        uint32_t w = (uint32_t(uint8_t(in[i])) << 16) | (uint32_t(uint8_t(in[i + 1])) << 8) | uint8_t(in[i + 2]);
        out.push_back(kB64[w >> 18]);
        out.push_back(kB64[(w >> 12) & 63]);
        out.push_back(kB64[(w >> 6) & 63]);
        out.push_back(kB64[w & 63]);
    }
    size_t rest = in.size() - i;
    if (rest) {
        uint32_t w = uint32_t(uint8_t(in[i])) << 16;
        if (rest == 2) w |= uint32_t(uint8_t(in[i + 1])) << 8;
        out.push_back(kB64[w >> 18]);
        out.push_back(kB64[(w >> 12) & 63]);
        out.push_back(rest == 2 ? kB64[(w >> 6) & 63] : '=');
        out.push_back('=');
    }
}
}  // namespace

std::vector<std::pair<std::string, Rank>> Encoder::parse_tiktoken(std::string_view contents) {
    std::vector<std::pair<std::string, Rank>> out;
    size_t line_no = 0;
    size_t pos = 0;
    std::string token;
    while (pos < contents.size()) {
        size_t eol = contents.find('\n', pos);
        if (eol == std::string_view::npos) eol = contents.size();
        std::string_view line = contents.substr(pos, eol - pos);
        pos = eol + 1;
        ++line_no;
        if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
        if (line.empty()) continue;
        size_t sp = line.find(' ');
        if (sp == std::string_view::npos)
            throw ParseError(line_no, "expected '<base64 token> <rank>', found no space");
        std::string_view b64 = line.substr(0, sp), num = line.substr(sp + 1);
        if (!b64_decode(b64, token)) throw ParseError(line_no, "the token is not valid base64");
        if (num.empty() || num.size() > 10) throw ParseError(line_no, "the rank is not a number below 2**32");
        uint64_t r = 0;
        for (char ch : num) {
            if (ch < '0' || ch > '9') throw ParseError(line_no, "the rank is not a decimal number");
            r = r * 10 + uint64_t(ch - '0');
        }
        if (r >= kNoRank) throw ParseError(line_no, "the rank is not below 2**32 - 1");
        out.emplace_back(token, Rank(r));
    }
    return out;
}

Encoder::Encoder(std::vector<std::pair<std::string, Rank>> ranks, std::vector<std::pair<std::string, Rank>> specials)
    : specials_(std::move(specials)) {
    static std::atomic<uint64_t> next_uid{1};
    uid_ = next_uid.fetch_add(1);
    table_.build(ranks);
    for (int b = 0; b < 256; ++b) {
        char c = char(b);
        byte_rank_[b] = table_.find(std::string_view(&c, 1));
        if (byte_rank_[b] == kNoRank)
            throw InvalidArgument("the vocabulary lacks the single byte " + std::to_string(b) +
                                  "; every one of the 256 bytes must be a token");
    }
    pair2_.assign(65536, kNoRank);
    for (auto& kv : ranks)
        if (kv.first.size() == 2) pair2_[size_t(uint8_t(kv.first[0])) << 8 | uint8_t(kv.first[1])] = kv.second;
    uint64_t max_id = 0;
    for (auto& kv : ranks) max_id = std::max<uint64_t>(max_id, kv.second);
    for (auto& kv : specials_) {
        if (kv.first.empty()) throw InvalidArgument("a special token is empty");
        max_id = std::max<uint64_t>(max_id, kv.second);
    }
    n_vocab_ = size_t(max_id) + 1;
    dec_.assign(n_vocab_, Span{0, kNoToken});
    size_t total = 0;
    for (auto& kv : ranks) total += kv.first.size();
    for (auto& kv : specials_) total += kv.first.size();
    dec_arena_.reserve(total + kPad);
    auto add = [&](const std::pair<std::string, Rank>& kv) {
        if (dec_[kv.second].len != kNoToken)
            throw InvalidArgument("two tokens have the id " + std::to_string(kv.second));
        dec_[kv.second] = Span{uint32_t(dec_arena_.size()), uint32_t(kv.first.size())};
        max_token_len_ = std::max(max_token_len_, kv.first.size());
        dec_arena_ += kv.first;
    };
    for (auto& kv : ranks) add(kv);
    for (auto& kv : specials_) add(kv);
    dec_arena_.append(kPad, '\0');
    inline_.assign(n_vocab_, Inline{{}, kNoToken});
    for (size_t id = 0; id < n_vocab_; ++id) {
        inline_[id].len = dec_[id].len;
        if (dec_[id].len <= sizeof(Inline::bytes)) std::memcpy(inline_[id].bytes, dec_arena_.data() + dec_[id].off, dec_[id].len);
    }
}

std::string Encoder::to_tiktoken() const {
    std::vector<std::pair<Rank, std::string_view>> items;
    items.reserve(table_.size());
    std::vector<bool> special(n_vocab_, false);
    for (auto& kv : specials_) special[kv.second] = true;
    for (size_t id = 0; id < n_vocab_; ++id)
        if (dec_[id].len != kNoToken && !special[id])
            items.emplace_back(Rank(id), std::string_view(dec_arena_.data() + dec_[id].off, dec_[id].len));
    std::string out;
    for (auto& it : items) {
        b64_encode(it.second, out);
        out.push_back(' ');
        out += std::to_string(it.first);
        out.push_back('\n');
    }
    return out;
}

// ---------------------------------------------------------------------------------------------
// Encoder: byte-pair merging
// ---------------------------------------------------------------------------------------------

// a[i] = a[i + 1] for i in [from, to): the arrays of merge_small, which have room for the copy to
// run in whole 16-byte steps past `to` (an inline loop: a call to memmove costs more than these
// few elements do).
inline void shift_down(uint32_t* a, size_t from, size_t to) {
#if defined(__SSE2__)
    for (size_t i = from; i < to; i += 4)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(a + i), _mm_loadu_si128(reinterpret_cast<const __m128i*>(a + i + 1)));
#else
    for (size_t i = from; i < to; ++i) a[i] = a[i + 1];
#endif
}

namespace {
// A per-thread cache of the merge's lookups: the pair of two parts' ranks to the rank of their
// join (kNoRank where it is no token). Pieces the cache of pieces does not hold still repeat the
// same pairs of parts, and an entry here answers one from the processor's cache, without hashing the
// pair's bytes or reading the rank table (3 MiB for GPT-2). Direct-mapped, keys compared whole:
// kPairs entries of 16 bytes (128 KiB) on each thread that merges.
struct PairCache {
    struct Entry {
        Rank a, b, rank, pad;  // a == kNoRank: empty (no part has that rank)
    };
    static constexpr unsigned kBits = 13;
    static constexpr size_t kPairs = size_t(1) << kBits;
    Entry* e = nullptr;
    uint64_t owner = 0;
    ~PairCache() { std::free(e); }
    static size_t slot(Rank a, Rank b) {
        return size_t(((uint64_t(a) << 32 | b) * 0x9E3779B97F4A7C15ull) >> (64 - kBits));
    }
};
thread_local PairCache t_pairs;

inline PairCache& pair_cache_for(uint64_t uid) {
    PairCache& c = t_pairs;
    if (c.owner != uid || !c.e) {
        if (!c.e) {
            c.e = static_cast<PairCache::Entry*>(std::malloc(PairCache::kPairs * sizeof(PairCache::Entry)));
            if (!c.e) throw std::bad_alloc();
        }
        std::memset(c.e, 0xFF, PairCache::kPairs * sizeof(PairCache::Entry));  // every a = kNoRank
        c.owner = uid;
    }
    return c;
}
}  // namespace

namespace {
struct Counting {  // 0, 1, 2, ...: the boundaries of a piece's bytes before any merge
    uint32_t v[24];
    constexpr Counting() : v() {
        for (uint32_t i = 0; i < 24; ++i) v[i] = i;
    }
};
constexpr Counting kCounting;

// The merge rule: repeatedly join the adjacent pair of parts whose concatenated bytes have the
// lowest rank, the leftmost such pair on ties, until no adjacent pair is a token. On p[0, n) into
// `out` (room for n ids); returns the number of ids. kShort: n is at most 15, and `key` holds the
// piece's bytes, zero-padded, in its first 15 bytes.
template <bool kShort>
size_t merge_rule(const RankTable& table, const Rank* byte_rank, const Rank* pair2, PairCache::Entry* pairs,
                  const uint8_t* p, size_t n, const uint64_t* key, Rank* out) {
    static_assert(sizeof(Rank) == sizeof(uint32_t), "shift_down moves 32-bit elements");
    constexpr size_t kRoom = (kShort ? 16 : kSmallPiece) + 8;  // shift_down's whole steps stay inside
    uint32_t st[kRoom];  // part i is [st[i], st[i+1])
    Rank rk[kRoom];      // rk[i]: rank of parts i and i+1 joined
    Rank part[kRoom];    // rank of part i
    size_t cnt = n + 1;  // boundaries
    if constexpr (kShort) {
        // A piece of up to 15 bytes is set up from its key (its bytes, zero-padded, in 16), in loops
        // of a fixed count: loops of n steps would each end on a mispredicted branch.
        uint8_t b[17];
        std::memcpy(b, key, 16);
        b[16] = 0;
        static_assert(sizeof st == sizeof kCounting.v, "the short arrays' room");
        std::memcpy(st, kCounting.v, sizeof st);
        for (size_t i = 0; i < 16; ++i) part[i] = byte_rank[b[i]];
        for (size_t i = 0; i < 16; ++i) {
            const Rank r = pair2[size_t(b[i]) << 8 | b[i + 1]];
            rk[i] = i + 1 < n ? r : kNoRank;
        }
    } else {
        for (size_t i = 0; i <= n; ++i) st[i] = uint32_t(i);
        for (size_t i = 0; i < n; ++i) part[i] = byte_rank[p[i]];
    }
    // A pair that a merge makes is 3 bytes or more: its rank is in the pair cache or the table. The
    // cache is read, and on a miss the pair's head and hash taken and its slot fetched, before the
    // arrays shift, so that the two lookups' waits overlap the shift and each other.
    struct Key {
        uint64_t head = 0, hash = 0;
        uint32_t from = 0, len = 0;  // len 0: too long to be a token
        Rank a = 0, b = 0, rank = kNoRank;  // rank: the answer, where entry is null (a cache hit, or no pair)
        PairCache::Entry* entry = nullptr;  // where the pair's rank goes once looked up
    };
    const size_t max_len = table.max_len();
    auto key_of = [&](uint32_t from, uint32_t to, Rank a, Rank b) {
        Key k;
        PairCache::Entry* e = pairs + PairCache::slot(a, b);
        if (e->a == a && e->b == b) {
            k.rank = e->rank;
            return k;
        }
        k.a = a;
        k.b = b;
        k.entry = e;
        k.from = from;
        k.len = to - from;
        if (k.len > max_len) {
            k.len = 0;
            return k;
        }
        k.head = RankTable::key_head(p + from, k.len);
        k.hash = RankTable::key_hash(p + from, k.len, k.head);
        table.prefetch(k.hash);
        return k;
    };
    auto rank_of = [&](const Key& k) {
        if (!k.entry) return k.rank;
        const Rank r = k.len ? table.find_hashed(p + k.from, k.len, k.head, k.hash) : kNoRank;
        *k.entry = PairCache::Entry{k.a, k.b, r, 0};
        return r;
    };
    if constexpr (!kShort) {
        for (size_t i = 0; i + 1 < n; ++i) rk[i] = pair2[size_t(p[i]) << 8 | p[i + 1]];
        rk[n - 1] = kNoRank;
    }
    while (cnt > 2) {
        // the lowest (rank, position), without a branch on each compare: rank above, position below
        uint64_t low = ~uint64_t(0);
        for (size_t i = 0; i + 2 < cnt; ++i) low = std::min(low, uint64_t(rk[i]) << 32 | i);
        const Rank best = Rank(low >> 32);
        const size_t bi = size_t(uint32_t(low));
        if (best == kNoRank) break;
        // the merged part is [st[bi], st[bi + 2]); its pairs with the parts either side
        const Key right = bi + 3 < cnt ? key_of(st[bi], st[bi + 3], best, part[bi + 2]) : Key{};
        const Key left = bi > 0 ? key_of(st[bi - 1], st[bi + 2], part[bi - 1], best) : Key{};
        shift_down(st, bi + 1, cnt - 1);
        shift_down(rk, bi + 1, cnt - 2);
        shift_down(part, bi + 1, cnt - 2);
        part[bi] = best;
        --cnt;
        rk[bi] = rank_of(right);
        if (bi > 0) rk[bi - 1] = rank_of(left);
    }
    std::memcpy(out, part, (cnt - 1) * sizeof(Rank));
    return cnt - 1;
}
}  // namespace

size_t Encoder::merge_small(const uint8_t* p, size_t n, Rank* out) const {
    return merge_rule<false>(table_, byte_rank_, pair2_.data(), pair_cache_for(uid_).e, p, n, nullptr, out);
}

size_t Encoder::merge_short(const uint8_t* p, size_t n, const uint64_t* key, Rank* out) const {
    return merge_rule<true>(table_, byte_rank_, pair2_.data(), pair_cache_for(uid_).e, p, n, key, out);
}

void Encoder::bpe_small(const uint8_t* p, size_t n, std::vector<Rank>& out) const {
    const size_t at = out.size();
    out.resize(at + n);
    out.resize(at + merge_small(p, n, out.data() + at));
}

namespace {
// Scratch space for long pieces: parts as a linked list over byte positions (one 16-byte node per
// position, so a merge touches few cache lines) and a bucket queue keyed by (rank, position).
struct LargeWork {
    struct Node {
        uint32_t nxt, prv;  // next/previous part start
        Rank cur;           // rank of this part joined with the next one
        Rank part;          // rank of this part
    };
    std::vector<Node> node;
    std::vector<std::vector<uint32_t>> fifo;  // positions pushed in increasing order
    std::vector<uint32_t> fifo_head;
    std::vector<std::vector<uint32_t>> heap;  // min-heaps of positions pushed later
    std::vector<uint64_t> bits0, bits1;       // non-empty buckets

    void prepare(size_t n, size_t n_ranks) {
        node.resize(n + 1);
        if (fifo.size() < n_ranks) {
            fifo.resize(n_ranks);
            fifo_head.resize(n_ranks, 0);
            heap.resize(n_ranks);
            bits0.assign((n_ranks + 63) / 64, 0);
            bits1.assign((bits0.size() + 63) / 64, 0);
        }
    }
    void mark(Rank r) {
        bits0[r >> 6] |= 1ull << (r & 63);
        bits1[r >> 12] |= 1ull << ((r >> 6) & 63);
    }
    void unmark(Rank r) {
        bits0[r >> 6] &= ~(1ull << (r & 63));
        if (bits0[r >> 6] == 0) bits1[r >> 12] &= ~(1ull << ((r >> 6) & 63));
    }
    Rank first() const {
        for (size_t j = 0; j < bits1.size(); ++j)
            if (bits1[j]) {
                size_t k = j * 64 + size_t(__builtin_ctzll(bits1[j]));
                return Rank(k * 64 + size_t(__builtin_ctzll(bits0[k])));
            }
        return kNoRank;
    }
    void push_initial(Rank r, uint32_t pos) {
        fifo[r].push_back(pos);
        mark(r);
    }
    void push(Rank r, uint32_t pos) {
        heap[r].push_back(pos);
        std::push_heap(heap[r].begin(), heap[r].end(), std::greater<uint32_t>());
        mark(r);
    }
    uint32_t pop(Rank r) {
        auto& f = fifo[r];
        auto& h = heap[r];
        uint32_t& hd = fifo_head[r];
        uint32_t pos;
        if (hd < f.size() && (h.empty() || f[hd] < h.front())) {
            pos = f[hd++];
            if (hd + 8 < f.size()) __builtin_prefetch(&node[f[hd + 8]]);
        } else {
            std::pop_heap(h.begin(), h.end(), std::greater<uint32_t>());
            pos = h.back();
            h.pop_back();
        }
        if (hd >= f.size() && h.empty()) {
            f.clear();
            hd = 0;
            unmark(r);
        }
        return pos;
    }
};
}  // namespace

// The same rule as bpe_small in O(n log n): a linked list of parts and a bucket queue.
void Encoder::bpe_heap(const uint8_t* p, size_t n, std::vector<Rank>& out) const {
    thread_local LargeWork w;
    w.prepare(n, n_vocab_);
    const uint32_t N = uint32_t(n);
    LargeWork::Node* nd = w.node.data();
    for (uint32_t i = 0; i < N; ++i) {
        nd[i].nxt = i + 1;
        nd[i].prv = i == 0 ? kMissing : i - 1;
        nd[i].part = byte_rank_[p[i]];
        Rank r = i + 1 < N ? pair2_[size_t(p[i]) << 8 | p[i + 1]] : kNoRank;
        nd[i].cur = r;
        if (r != kNoRank) w.push_initial(r, i);
    }
    auto pair_rank = [&](uint32_t i) -> Rank {  // part i joined with the next part
        uint32_t j = nd[i].nxt;
        if (j >= N) return kNoRank;
        return find(p + i, nd[j].nxt - i);
    };
    for (;;) {
        Rank r = w.first();
        if (r == kNoRank) break;
        uint32_t pos = w.pop(r);
        if (nd[pos].cur != r) continue;  // stale entry
        uint32_t q = nd[pos].nxt;
        uint32_t after = nd[q].nxt;
        nd[pos].nxt = after;
        nd[pos].part = r;
        if (after < N) nd[after].prv = pos;
        nd[q].cur = kNoRank;
        nd[q].nxt = kMissing;
        Rank nr = pair_rank(pos);
        nd[pos].cur = nr;
        if (nr != kNoRank) w.push(nr, pos);
        uint32_t pp = nd[pos].prv;
        if (pp != kMissing) {
            Rank pr = pair_rank(pp);
            nd[pp].cur = pr;
            if (pr != kNoRank) w.push(pr, pp);
        }
    }
    for (uint32_t i = 0; i < N; i = nd[i].nxt) out.push_back(nd[i].part);
}

// Building the walk's tables takes 30-100 ms, more than a first pass over megabytes of ordinary text
// costs: pieces of a few kilobytes (a rule of '=' in a text file, a run of spaces) are merged until
// a piece long enough to pay for them comes (or they are built for another reason).
constexpr size_t kBuildLongTablesAt = 16384;

void Encoder::bpe_large(const uint8_t* p, size_t n, std::vector<Rank>& out) const {
    if (n < kBuildLongTablesAt && !long_->ready.load(std::memory_order_acquire)) return bpe_heap(p, n, out);
    if (!bpe_backtrack(p, n, out)) bpe_heap(p, n, out);
}

namespace {
// `bytes` of zeroed memory, 64-byte aligned (2 MiB aligned from 2 MiB on, and on huge pages where the
// kernel leaves that to the program: a probe of a table of many MiB then costs no page walk). Fresh
// pages from calloc are zero without a pass over them, so the table costs nothing until it is used.
// `*raw` gets the block to free.
void* zeroed_table(size_t bytes, void** raw) {
    constexpr size_t kHuge = size_t(2) << 20;
    const size_t align = bytes >= kHuge ? kHuge : 64;
    *raw = std::calloc(1, bytes + align);
    if (!*raw) throw std::bad_alloc();
    void* p = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(*raw) + align - 1) & ~uintptr_t(align - 1));
#ifdef __linux__
    if (bytes >= kHuge) madvise(p, bytes & ~(kHuge - 1), MADV_HUGEPAGE);  // a hint; failure is harmless
#endif
    return p;
}

}  // namespace

namespace {
// A per-thread cache of short pieces that are more than one token: code and non-English text repeat
// the same identifiers and words, and a lookup is far cheaper than merging. Keys are compared whole,
// so a hit is always the piece's own encoding; a miss merges. The table is fixed in size, two-way
// set associative: a set is two 64-byte entries side by side, and a new piece goes in front,
// pushing the entry there to the back (and the back one out). This is the cache's second level (see
// SmallCache for the first); with it, the whole cache takes Encoder::piece_cache_bytes() on each
// thread that encodes (24 MiB at the default setting of 2^17 sets), whatever the text.
struct PieceCache {
    static constexpr size_t kKey = 30;       // the longest piece kept, in bytes
    static constexpr size_t kTokens16 = 16;  // tokens an entry holds when every id is below 2^16
    static constexpr size_t kTokens32 = 8;   // and otherwise
    static constexpr size_t kDefaultSets = size_t(1) << 17;
    struct alignas(64) Entry {
        uint8_t key_len = 0, n_tokens = 0;  // key_len 0: empty
        uint8_t key[kKey];
        uint8_t tokens[32];  // n_tokens ids of 2 or 4 bytes each (Cache::wide)
    };
    static_assert(sizeof(Entry) == 64, "one cache line an entry");
    Entry* entries = nullptr;  // 2 * sets
    void* raw = nullptr;
    size_t n_entries = 0;
    size_t mask = 0;             // sets - 1
    uint64_t owner = 0;          // uid of the Encoder the entries belong to
    bool wide = false;           // 32-bit ids
    size_t max_tokens = kTokens16;

    Entry* set_of(uint64_t hash) { return &entries[((hash >> 17) & mask) * 2]; }
    ~PieceCache() { std::free(raw); }
};

std::atomic<size_t> g_cache_sets{PieceCache::kDefaultSets};
thread_local PieceCache t_cache;

// The cache's third level: pieces of up to 128 bytes that the second does not hold (from the encode
// loop, pieces of 16 to 128 bytes: longer than its keys, or more ids than its entries): long words of scripts whose letters are two or three bytes,
// runs of CJK text, long runs of punctuation. They are few, but each costs a merge of dozens of
// bytes. Direct-mapped by the piece's hash; a slot points into an arena that holds the piece's
// bytes (compared whole, so a hit is the piece's own) and then its ids. When the arena is full, the
// level is emptied and starts again. Bound: LongCache::kBytes on each thread that meets such a piece.
struct LongCache {
    static constexpr unsigned kBits = 12;               // slots
    static constexpr size_t kArena = size_t(1) << 20;  // bytes of pieces and ids
    struct Slot {
        uint64_t hash;
        uint32_t at;               // the piece's bytes in the arena, then its ids (4 bytes each)
        uint16_t len = 0, n_ids;  // len 0: empty
    };
    static constexpr size_t kBytes = (size_t(1) << kBits) * sizeof(Slot) + kArena;
    static_assert(kSmallPiece * (1 + sizeof(Rank)) <= kArena && kSmallPiece <= 0xFFFF, "a piece fits");
    std::unique_ptr<Slot[]> slots;
    std::unique_ptr<uint8_t[]> arena;
    size_t used = 0;
    uint64_t owner = 0;

    Slot& slot_of(uint64_t hash) { return slots[hash >> (64 - kBits)]; }
    void empty() {
        for (size_t i = 0; i < (size_t(1) << kBits); ++i) slots[i].len = 0;
        used = 0;
    }
    // The ids of p[0, n) appended to out; false where the level does not hold the piece.
    bool find(const uint8_t* p, size_t n, uint64_t hash, std::vector<Rank>& out) {
        const Slot& sl = slot_of(hash);
        if (sl.len != n || sl.hash != hash || std::memcmp(arena.get() + sl.at, p, n) != 0) return false;
        const size_t at = out.size();
        out.resize(at + sl.n_ids);
        std::memcpy(out.data() + at, arena.get() + sl.at + n, sl.n_ids * sizeof(Rank));
        return true;
    }
    // (n is at most kSmallPiece bytes, and k at most n ids: a piece always fits the empty arena)
    void store(const uint8_t* p, size_t n, uint64_t hash, const Rank* ids, size_t k) {
        const size_t need = n + k * sizeof(Rank);
        if (used + need > kArena) empty();
        std::memcpy(arena.get() + used, p, n);
        std::memcpy(arena.get() + used + n, ids, k * sizeof(Rank));
        slot_of(hash) = Slot{hash, uint32_t(used), uint16_t(n), uint16_t(k)};
        used += need;
    }
};
thread_local LongCache t_long;

inline LongCache& long_cache_for(uint64_t uid) {
    LongCache& c = t_long;
    if (!c.slots) {
        c.slots.reset(new LongCache::Slot[size_t(1) << LongCache::kBits]);
        c.arena.reset(new uint8_t[LongCache::kArena]);
        c.owner = 0;
    }
    if (c.owner != uid) {
        c.empty();
        c.owner = uid;
    }
    return c;
}
}  // namespace

void Encoder::set_piece_cache_sets(size_t sets) {
    size_t s = 1;
    while (s < sets) s <<= 1;
    g_cache_sets = std::max<size_t>(1, s);
}
size_t Encoder::piece_cache_sets() { return g_cache_sets; }
namespace {
// The second level has half as many sets as the setting (it holds the rarer pieces), the first level
// twice as many buckets of two 32-byte entries: 192 bytes a set in all.
inline size_t second_level_sets(size_t sets) { return std::max<size_t>(1, sets / 2); }
inline size_t first_level_buckets(size_t sets) { return 2 * sets; }
}  // namespace

size_t Encoder::piece_cache_bytes() {
    const size_t sets = g_cache_sets;
    return second_level_sets(sets) * 2 * sizeof(PieceCache::Entry) + first_level_buckets(sets) * 64 + LongCache::kBytes;
}

namespace {
// The calling thread's cache, emptied when it last held another encoder's pieces or another size.
inline PieceCache& cache_for(uint64_t uid, size_t n_vocab) {
    PieceCache& c = t_cache;
    const size_t sets = second_level_sets(g_cache_sets.load(std::memory_order_relaxed));
    if (c.owner != uid || c.n_entries != 2 * sets || !c.entries) {
        std::free(c.raw);
        c.raw = nullptr;
        c.entries = nullptr;
        c.entries = static_cast<PieceCache::Entry*>(zeroed_table(2 * sets * sizeof(PieceCache::Entry), &c.raw));
        c.n_entries = 2 * sets;
        c.mask = sets - 1;
        c.owner = uid;
        c.wide = n_vocab > 65536;
        c.max_tokens = c.wide ? PieceCache::kTokens32 : PieceCache::kTokens16;
    }
    return c;
}

inline bool same_key(const PieceCache::Entry& e, const uint8_t* p, size_t n) {
    return e.key_len == n && std::memcmp(e.key, p, n) == 0;
}

// The entry of the piece p[0, n) in its set, or nullptr.
inline const PieceCache::Entry* find_in(const PieceCache::Entry* set, const uint8_t* p, size_t n) {
    return same_key(set[0], p, n) ? &set[0] : same_key(set[1], p, n) ? &set[1] : nullptr;
}

// Writes an entry's tokens at o; returns how many.
inline size_t emit(const PieceCache& c, const PieceCache::Entry& e, Rank* o) {
    const size_t k = e.n_tokens;
    if (c.wide) {
        std::memcpy(o, e.tokens, k * 4);
    } else {
        uint16_t t[PieceCache::kTokens16];
        std::memcpy(t, e.tokens, sizeof t);
        for (size_t i = 0; i < k; ++i) o[i] = t[i];
    }
    return k;
}

// The same, writing all the ids an entry can hold whatever its count (the caller's output has room
// for 16 ids past the piece's), without a loop over the count.
inline size_t emit_whole(const PieceCache& c, const PieceCache::Entry& e, Rank* o) {
    if (c.wide) {
        std::memcpy(o, e.tokens, sizeof e.tokens);
    } else {
#if defined(__SSE2__)
        const __m128i z = _mm_setzero_si128();
        for (int j = 0; j < 2; ++j) {
            const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(e.tokens + 16 * j));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 8 * j), _mm_unpacklo_epi16(v, z));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 8 * j + 4), _mm_unpackhi_epi16(v, z));
        }
#else
        emit(c, e, o);
#endif
    }
    return e.n_tokens;
}

inline void emit(const PieceCache& c, const PieceCache::Entry& e, std::vector<Rank>& out) {
    const size_t at = out.size();
    out.resize(at + e.n_tokens);
    emit(c, e, out.data() + at);
}

// Puts the piece p[0, n) and its `got` ids in front of its set (if they fit an entry).
inline void store(const PieceCache& c, PieceCache::Entry* set, const uint8_t* p, size_t n, const Rank* ids,
                  size_t got) {
    if (got > c.max_tokens) return;
    set[1] = set[0];
    PieceCache::Entry& e = set[0];
    e.key_len = uint8_t(n);
    e.n_tokens = uint8_t(got);
    std::memcpy(e.key, p, n);
    if (c.wide) {
        std::memcpy(e.tokens, ids, got * 4);
    } else {
        uint16_t t[PieceCache::kTokens16] = {};
        for (size_t i = 0; i < got; ++i) t[i] = uint16_t(ids[i]);
        std::memcpy(e.tokens, t, sizeof t);
    }
}
}  // namespace

void Encoder::encode_piece(const uint8_t* p, size_t n, std::vector<Rank>& out) const {
    if (n <= 2) {
        Rank r = find(p, n);
        if (r != kNoRank) return out.push_back(r);
        return bpe_small(p, n, out);
    }
    const uint64_t head = RankTable::key_head(p, n);
    if (n > PieceCache::kKey && n > table_.max_len())
        return n <= kSmallPiece ? encode_long(p, n, RankTable::key_hash(p, n, head), out) : bpe_large(p, n, out);
    encode_hashed(p, n, head, RankTable::key_hash(p, n, head), out);
}

// A piece of up to kSmallPiece bytes that is no token and that the second level does not hold.
void Encoder::encode_long(const uint8_t* p, size_t n, uint64_t h, std::vector<Rank>& out) const {
    LongCache& c = long_cache_for(uid_);
    if (c.find(p, n, h, out)) return;
    const size_t before = out.size();
    bpe_small(p, n, out);
    c.store(p, n, h, out.data() + before, out.size() - before);
}

// A piece of 3 or more bytes, short enough for the table or the cache, with its hash.
void Encoder::encode_hashed(const uint8_t* p, size_t n, uint64_t head, uint64_t h, std::vector<Rank>& out) const {
    if (n <= table_.max_len()) {
        Rank r = table_.find_hashed(p, n, head, h);
        if (r != kNoRank) return out.push_back(r);
    }
    if (n > PieceCache::kKey) return n <= kSmallPiece ? encode_long(p, n, h, out) : bpe_large(p, n, out);
    PieceCache& cache = cache_for(uid_, n_vocab_);
    PieceCache::Entry* set = cache.set_of(h);
    if (const PieceCache::Entry* e = find_in(set, p, n)) return emit(cache, *e, out);
    // not in the second level: in the third, or merged and kept in whichever level holds its ids
    LongCache& lc = long_cache_for(uid_);
    if (lc.find(p, n, h, out)) return;
    const size_t before = out.size();
    bpe_small(p, n, out);
    const size_t k = out.size() - before;
    if (k <= cache.max_tokens)
        store(cache, set, p, n, out.data() + before, k);
    else
        lc.store(p, n, h, out.data() + before, k);
}

namespace {
// The first level of the piece cache: pieces of 1 to 15 bytes that are at most 7 tokens (3 of 32-bit ids)
// (the single-token pieces included: most pieces of real text are one), each in a 32-byte entry
// that holds its key whole (the bytes, zero-padded, and the length in the last byte) and its
// tokens, so a hit costs one cache line and two compares. Two entries a bucket (one 64-byte line);
// a new piece goes in front and pushes the front one to the back (and the back one out).
// Pieces of more tokens, or longer ones, go to PieceCache.
struct SmallCache {
    struct alignas(32) Entry {
        uint64_t k0, k1;  // k1 == 0: empty (a key's length byte is never 0)
        uint8_t v[16];    // up to 7 ids of 16 bits (or 3 of 32) from v[0], and their count in v[15]
    };
    static_assert(sizeof(Entry) == 32, "two entries a cache line");
    Entry* e = nullptr;  // 2 * buckets, 64-byte aligned
    void* raw = nullptr;
    size_t mask = 0;     // buckets - 1
    unsigned shift = 0;  // 64 - log2(buckets)
    uint64_t owner = 0;
    bool wide = false;
    size_t max_tokens = 7;  // ids a value holds: 7 of 16 bits, or 3 of 32
    ~SmallCache() { std::free(raw); }
    Entry* bucket(size_t slot) const { return e + (slot << 1); }
};
thread_local SmallCache t_small;

inline SmallCache& small_cache_for(uint64_t uid, size_t n_vocab) {
    SmallCache& c = t_small;
    const size_t buckets = first_level_buckets(g_cache_sets.load(std::memory_order_relaxed));
    if (c.owner != uid || c.mask + 1 != buckets || !c.e) {
        std::free(c.raw);
        c.raw = nullptr;
        c.e = nullptr;
        const size_t bytes = buckets * 2 * sizeof(SmallCache::Entry);
        c.e = static_cast<SmallCache::Entry*>(zeroed_table(bytes, &c.raw));
        c.mask = buckets - 1;
        c.shift = unsigned(64 - __builtin_ctzll(buckets));
        c.owner = uid;
        c.wide = n_vocab > 65536;
        c.max_tokens = c.wide ? 3 : 7;
    }
    return c;
}

// The masks that clear a key's bytes past a piece of n bytes (n < 16), and its length byte.
struct KeyMasks {
    uint64_t lo[16], hi[16];
    constexpr KeyMasks() : lo(), hi() {
        for (size_t n = 0; n < 16; ++n) {
            lo[n] = n >= 8 ? ~uint64_t(0) : (uint64_t(1) << (8 * n)) - 1;
            hi[n] = n <= 8 ? 0 : (uint64_t(1) << (8 * (n - 8))) - 1;
        }
    }
};
constexpr KeyMasks kKeyMasks;

// The key of a piece of 1 to 15 bytes at p (`end`: the end of the text, which a load may not pass;
// kInText: the caller knows that 16 bytes from p are inside the text).
template <bool kInText = false>
inline void small_key(const uint8_t* p, size_t n, const uint8_t* end, uint64_t* k0, uint64_t* k1) {
    uint64_t a, b;
    if (kInText || __builtin_expect(size_t(end - p) >= 16, 1)) {
        std::memcpy(&a, p, 8);
        std::memcpy(&b, p + 8, 8);
    } else {
        uint8_t buf[16] = {};
        std::memcpy(buf, p, n);
        std::memcpy(&a, buf, 8);
        std::memcpy(&b, buf + 8, 8);
    }
    *k0 = a & kKeyMasks.lo[n];
    *k1 = (b & kKeyMasks.hi[n]) | (uint64_t(n) << 56);
}

// The bucket of a key: the top bits of a multiplicative hash (`shift`: 64 - log2 of the buckets).
inline size_t small_slot(uint64_t k0, uint64_t k1, unsigned shift) {
    return size_t(((k0 ^ (k1 * 0xC2B2AE3D27D4EB4Full)) * 0x9E3779B97F4A7C15ull) >> shift);
}

// An entry's value v[0, 16) holds, by its last byte v[15]:
//   * 0 to 7 (3 where ids are 32-bit): that many ids, 16 bits each (32) from v[0];
//   * kTail | e: e ids from v[0], then one token per byte of the piece from byte v[14] on (each a
//     single byte's token): whitespace runs and the like, which are more tokens than an entry holds;
//   * kFar: the piece is more tokens than either form holds; they are in PieceCache.
constexpr uint8_t kTail = 0x80, kFar = 0xFF;

// Writes an entry's tokens at o (8 ids, 32 bytes, whatever the count) where v[15] is a count, and
// returns it; otherwise returns v[15] (kTail or more), having written the entry's first ids.
inline size_t small_emit(const SmallCache::Entry& en, bool wide, Rank* o) {
    const size_t k = en.v[15];
#if defined(__SSE2__)
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(en.v));
    if (wide) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(o), v);
    } else {
        const __m128i z = _mm_setzero_si128();
        _mm_storeu_si128(reinterpret_cast<__m128i*>(o), _mm_unpacklo_epi16(v, z));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 4), _mm_unpackhi_epi16(v, z));
    }
#else
    if (wide) {
        std::memcpy(o, en.v, 12);
    } else {
        for (size_t i = 0; i < 7; ++i) o[i] = Rank(en.v[2 * i]) | (Rank(en.v[2 * i + 1]) << 8);
    }
#endif
    return k;
}

// The single-byte tokens of a kTail entry of the piece p[0, n), after its first ids (which
// small_emit wrote at o); returns the number of ids of the piece.
inline size_t small_tail(const SmallCache::Entry& en, const uint8_t* p, size_t n, const Rank* byte_rank, Rank* o) {
    const size_t e = en.v[15] & 0x7F, t = en.v[14];
    Rank* q = o + e;
    for (size_t j = t; j < n; ++j) *q++ = byte_rank[p[j]];
    return e + (n - t);
}

// Puts the piece p[0, n) with key (k0, k1) and its k ids in front of bucket b, in the first form
// that holds them. False (storing nothing) where neither does.
inline bool small_store(const SmallCache& sc, SmallCache::Entry* b, uint64_t k0, uint64_t k1, const uint8_t* p,
                        size_t n, const Rank* ids, size_t k, const Rank* byte_rank) {
    const bool wide = sc.wide;
    uint8_t v[16] = {};
    size_t explicit_ids = k;
    if (k > sc.max_tokens) {
        // the longest run of single-byte tokens at the end (their ids take v[0, 14) at most, so v[14]
        // is free for where they start)
        size_t t = 0;
        while (t < k && t < n && ids[k - 1 - t] == byte_rank[p[n - 1 - t]]) ++t;
        explicit_ids = k - t;
        if (explicit_ids > sc.max_tokens) return false;
        v[14] = uint8_t(n - t);
        v[15] = uint8_t(kTail | explicit_ids);
    } else {
        v[15] = uint8_t(k);
    }
    if (wide) {
        std::memcpy(v, ids, explicit_ids * 4);
    } else {
        for (size_t i = 0; i < explicit_ids; ++i) {
            v[2 * i] = uint8_t(ids[i]);
            v[2 * i + 1] = uint8_t(ids[i] >> 8);
        }
    }
    b[1] = b[0];
    b[0].k0 = k0;
    b[0].k1 = k1;
    std::memcpy(b[0].v, v, sizeof v);
    return true;
}

inline void small_store_far(SmallCache::Entry* b, uint64_t k0, uint64_t k1) {
    b[1] = b[0];
    b[0].k0 = k0;
    b[0].k1 = k1;
    std::memset(b[0].v, 0, sizeof b[0].v);
    b[0].v[15] = kFar;
}
}  // namespace

namespace {
// The calling thread's two cache levels, found once per call of the encoder (a thread_local in a
// shared library is reached through a call, not worth making for every piece).
struct Caches {
    SmallCache& small;
    PieceCache& piece;
};
}  // namespace

// A piece of up to 15 bytes that the first level does not hold: it is one token, or it is merged
// (a piece the first level has not seen is almost never in the second, so that is not probed).
size_t Encoder::encode_small_miss(const uint8_t* p, size_t n, uint64_t k0, uint64_t k1, void* bucket,
                                  const void* caches, Rank* o) const {
    SmallCache::Entry* b = static_cast<SmallCache::Entry*>(bucket);
    const Caches& c = *static_cast<const Caches*>(caches);
    const SmallCache& sc = c.small;
    const uint64_t head = RankTable::key_head(p, n);
    const uint64_t hash = RankTable::key_hash(p, n, head);
    const Rank r = n <= table_.max_len() ? table_.find_hashed(p, n, head, hash) : kNoRank;
    if (r != kNoRank) {
        *o = r;
        small_store(sc, b, k0, k1, p, n, o, 1, byte_rank_);
        return 1;
    }
    const uint64_t key[2] = {k0, k1};
    const size_t k = merge_short(p, n, key, o);
    if (!small_store(sc, b, k0, k1, p, n, o, k, byte_rank_)) {
        small_store_far(b, k0, k1);
        store(c.piece, c.piece.set_of(hash), p, n, o, k);
    }
    return k;
}

// A piece of up to 15 bytes whose first-level entry is kFar.
// (Found from its key, without a call: these are about one piece in twenty in text of many scripts.)
size_t Encoder::encode_small_far(const uint8_t* p, size_t n, const uint64_t* key, const void* caches, Rank* o) const {
    const uint64_t lo = key[0], hi = key[1] & ~(uint64_t(0xFF) << 56);  // the bytes, without the length
    PieceCache& cache = static_cast<const Caches*>(caches)->piece;
    PieceCache::Entry* set = cache.set_of(hash_short(lo, hi, n));
    // an entry's first 15 key bytes, masked to n, against the piece's; which entry, taken as a value
    auto differs = [&](const PieceCache::Entry& e) {
        uint64_t a, b;
        std::memcpy(&a, e.key, 8);
        std::memcpy(&b, e.key + 8, 8);
        return ((a & kKeyMasks.lo[n]) ^ lo) | ((b & kKeyMasks.hi[n]) ^ hi) | (e.key_len ^ n);
    };
    const PieceCache::Entry& e = set[as_value(differs(set[0]) != 0)];
    if (__builtin_expect(differs(e) == 0, 1)) return emit_whole(cache, e, o);
    const size_t k = merge_short(p, n, key, o);
    store(cache, set, p, n, o, k);
    return k;
}

size_t Encoder::encode_ordinary_into(std::string_view text, Rank* dst) const {
    const uint8_t* s = reinterpret_cast<const uint8_t*>(text.data());
    const uint8_t* const end = s + text.size();
    const size_t n = text.size();
    Rank* o = dst;
    // Pieces are split and hashed a group at a time, their buckets fetched toward the core (to the
    // second level of the processor's cache) as they are found, and then looked up in order, each
    // bucket fetched the rest of the way a few pieces ahead: a probe then rarely waits on memory.
    // A piece of up to 15 bytes has its key in k0, k1 and its bucket in `at`; a longer one that
    // the second level may hold has its head and hash there.
    constexpr size_t kGroup = 256, kAhead = 16;
    struct Piece {
        uint64_t k0, k1;
        const SmallCache::Entry* at;
        uint32_t begin, len;
    };
    // a group is filled while it has fewer than kGroup pieces, a block's pieces (up to 64) at a time
    Piece group[kGroup + 64 + kAhead];
    const size_t cacheable = std::max(table_.max_len(), PieceCache::kKey);
    SmallCache& sc = small_cache_for(uid_, n_vocab_);
    PieceCache& cache = cache_for(uid_, n_vocab_);
    const bool wide = sc.wide;
    const unsigned shift = sc.shift;
    const SmallCache::Entry* const table = sc.e;
    const Rank* const byte_rank = byte_rank_;
    const Caches caches{sc, cache};
    thread_local std::vector<Rank> t_scratch;
    std::vector<Rank>& scratch = t_scratch;
    auto slow = [&](const uint8_t* p, size_t len, uint64_t head, uint64_t hash, bool hashed) {
        scratch.clear();
        if (hashed)
            encode_hashed(p, len, head, hash, scratch);
        else
            encode_piece(p, len, scratch);
        std::memcpy(o, scratch.data(), scratch.size() * sizeof(Rank));
        o += scratch.size();
    };
    // Looks up the group's pieces in order and writes their ids.
    auto probe = [&](const Piece* grp, size_t count, auto wide_ids) {
        constexpr bool kWide = decltype(wide_ids)::value;
        for (const Piece* pc = grp; pc != grp + count; ++pc) {
            __builtin_prefetch(pc[kAhead].at);
            const size_t len = pc->len;
            if (__builtin_expect(len <= 15, 1)) {
                const SmallCache::Entry* b = pc->at;
                const uint64_t k0 = pc->k0, k1 = pc->k1;
                // The entry to look at: the first where it is the piece's, else the second. The choice
                // is kept a value, not a branch (which would be mispredicted about every third
                // piece); the one branch is on whether the chosen entry is the piece's.
                const SmallCache::Entry* en = b + as_value(((b[0].k0 ^ k0) | (b[0].k1 ^ k1)) != 0);
                if (__builtin_expect(((en->k0 ^ k0) | (en->k1 ^ k1)) == 0, 1)) {
                    const size_t got = small_emit(*en, kWide, o);
                    if (__builtin_expect(got < kTail, 1))
                        o += got;
                    else if (got != kFar)
                        o += small_tail(*en, s + pc->begin, len, byte_rank, o);
                    else {
                        const uint64_t key[2] = {k0, k1};
                        o += encode_small_far(s + pc->begin, len, key, &caches, o);
                    }
                } else {
                    o += encode_small_miss(s + pc->begin, len, k0, k1, const_cast<SmallCache::Entry*>(b), &caches, o);
                }
                continue;
            }
            const uint8_t* p = s + pc->begin;
            if (len <= cacheable) {
                // a second-level hit is emitted here; anything else (a single token, a miss, a piece
                // too long for the second level) takes the general path
                const PieceCache::Entry* e = len <= PieceCache::kKey ? find_in(cache.set_of(pc->k1), p, len) : nullptr;
                if (e)
                    o += emit(cache, *e, o);
                else
                    slow(p, len, pc->k0, pc->k1, true);
            } else {
                slow(p, len, 0, 0, false);
            }
        }
    };
    BlockSplitter split(s, n);
    PieceStarts starts;
    size_t pos = 0, g = 0;
    // Adds the piece [pos, e) to the group. `in_text`: 16 bytes from pos are inside the text, so a
    // short piece's key is read with two plain loads.
    auto add = [&](size_t e, auto in_text) {
        Piece& pc = group[g++];
        const uint8_t* p = s + pos;
        const size_t len = e - pos;
        pc.begin = uint32_t(pos);
        pc.len = uint32_t(len);
        pos = e;
        if (__builtin_expect(len <= 15, 1)) {
            small_key<decltype(in_text)::value>(p, len, end, &pc.k0, &pc.k1);
            pc.at = table + (small_slot(pc.k0, pc.k1, shift) << 1);
#if defined(__SSE2__)
            _mm_prefetch(reinterpret_cast<const char*>(pc.at), _MM_HINT_T1);
#else
            __builtin_prefetch(pc.at, 0, 2);
#endif
            return;
        }
        pc.at = table;  // (prefetched 16 pieces ahead: any valid address)
        if (len <= cacheable) {
            pc.k0 = RankTable::key_head(p, len);
            pc.k1 = RankTable::key_hash(p, len, pc.k0);
            table_.prefetch(pc.k1);
            PieceCache::Entry* set = cache.set_of(pc.k1);
            __builtin_prefetch(set);
            __builtin_prefetch(set + 1);
        }
    };
    while (pos < n) {
        g = 0;
        while (g < kGroup && pos < n) {
            if (starts.bits && starts.base + 80 <= n) {
                // the rest of a block's pieces, with no check of the group's room or the text's end
                uint64_t bits = starts.bits;
                const size_t base = starts.base;
                starts.bits = 0;
                do {
                    const size_t e = base + size_t(__builtin_ctzll(bits));
                    bits &= bits - 1;
                    add(e, std::true_type{});
                } while (bits);
            } else {
                add(split.next(starts, pos), std::false_type{});
            }
        }
        for (size_t k = g; k < g + kAhead; ++k) group[k].at = table;  // prefetched past the end
        for (size_t k = 0; k < kAhead && k < g; ++k) __builtin_prefetch(group[k].at);
        // (one loop for each width of the ids an entry holds, so that none tests it per piece)
        if (wide)
            probe(group, g, std::true_type{});
        else
            probe(group, g, std::false_type{});
    }
    return size_t(o - dst);
}

void Encoder::encode_ordinary(std::string_view text, std::vector<Rank>& out) const {
    // Into a buffer the thread keeps (room for the worst case, one id a byte, without zeroing it or
    // faulting in fresh pages every call), then copied: the vector gets the ids' size, not the room.
    thread_local std::unique_ptr<Rank[]> buf;
    thread_local size_t cap = 0;
    constexpr size_t kKeep = size_t(16) << 20;  // ids; a larger buffer is freed after the call
    const size_t need = text.size() + kOutSlack;
    if (need > cap) {
        buf.reset();
        cap = 0;
        buf.reset(new Rank[std::max(need, size_t(1) << 16)]);
        cap = std::max(need, size_t(1) << 16);
    }
    const size_t got = encode_ordinary_into(text, buf.get());
    out.insert(out.end(), buf.get(), buf.get() + got);
    if (cap > kKeep) {
        buf.reset();
        cap = 0;
    }
}

void Encoder::encode(std::string_view text, const std::vector<bool>& allowed, std::vector<Rank>& out) const {
    std::vector<size_t> idx;
    for (size_t i = 0; i < specials_.size() && i < allowed.size(); ++i)
        if (allowed[i]) idx.push_back(i);
    if (idx.empty()) return encode_ordinary(text, out);
    std::vector<size_t> next(idx.size(), 0);
    std::vector<bool> fresh(idx.size(), false);
    size_t pos = 0;
    for (;;) {
        // The leftmost occurrence of an allowed special token; the longest on ties.
        size_t best = std::string_view::npos, best_len = 0, best_k = 0;
        for (size_t k = 0; k < idx.size(); ++k) {
            const std::string& sp = specials_[idx[k]].first;
            if (!fresh[k] || (next[k] != std::string_view::npos && next[k] < pos)) {
                next[k] = text.find(sp, pos);
                fresh[k] = true;
            }
            if (next[k] == std::string_view::npos) continue;
            if (next[k] < best || (next[k] == best && sp.size() > best_len)) {
                best = next[k];
                best_len = sp.size();
                best_k = k;
            }
        }
        if (best == std::string_view::npos) {
            encode_ordinary(text.substr(pos), out);
            return;
        }
        encode_ordinary(text.substr(pos, best - pos), out);
        out.push_back(specials_[idx[best_k]].second);
        pos = best + best_len;
    }
}

namespace {
// Worker threads kept for the life of the process: a batch's threads then find their piece caches
// warm from the batches before (threads started per call would start every batch cold, and pay for
// mapping their caches each time). Workers are started as a batch asks for more; a child made by
// fork() starts a new pool (the parent's workers do not exist there). Never destroyed, so no worker
// is joined while the interpreter exits.
class WorkerPool {
  public:
    static WorkerPool& get() {
        static const bool hooked = [] {
#ifdef __unix__
            pthread_atfork(nullptr, nullptr, [] { instance() = nullptr; });
#endif
            return true;
        }();
        (void)hooked;
        WorkerPool*& p = instance();
        if (!p) p = new WorkerPool();
        return *p;
    }
    // Queues `k` runs of `job`; starts workers until there are at least k. `job` must outlive them.
    void submit(size_t k, const std::function<void()>* job) {
        std::lock_guard<std::mutex> lock(mu_);
        while (workers_ < k) {
            std::thread(&WorkerPool::loop, this).detach();  // throws std::system_error if none can start
            ++workers_;
        }
        for (size_t i = 0; i < k; ++i) queue_.push_back(job);
        cv_.notify_all();
    }

  private:
    static WorkerPool*& instance() {
        static WorkerPool* p = nullptr;
        return p;
    }
    void loop() {
        t_batch_worker = true;
        for (;;) {
            const std::function<void()>* job;
            {
                std::unique_lock<std::mutex> lock(mu_);
                cv_.wait(lock, [&] { return !queue_.empty(); });
                job = queue_.front();
                queue_.pop_front();
            }
            (*job)();
        }
    }
    std::mutex mu_;
    std::condition_variable cv_;
    std::deque<const std::function<void()>*> queue_;
    size_t workers_ = 0;
};
}  // namespace

void Encoder::encode_batch_each(const std::vector<std::string_view>& texts, const std::vector<bool>* allowed,
                                int num_threads,
                                const std::function<void(size_t, size_t, std::vector<std::vector<Rank>>&)>& consume) const {
    const size_t n = texts.size();
    std::vector<std::vector<Rank>> out(n);
    std::vector<uint8_t> done(n, 0);  // guarded by mu
    std::mutex mu;
    std::condition_variable ready;
    std::atomic<size_t> next{0};
    std::atomic<bool> stop{false};
    size_t running = 0;  // workers inside `work`, guarded by mu
    const std::function<void()> work = [&]() {
        for (;;) {
            const size_t i = next.fetch_add(1);
            if (i >= n || stop.load(std::memory_order_relaxed)) break;
            try {
                if (allowed)
                    encode(texts[i], *allowed, out[i]);
                else
                    encode_ordinary(texts[i], out[i]);
            } catch (...) {  // (out of memory) the caller finds the text not done and stops
                stop = true;
            }
            {
                std::lock_guard<std::mutex> lock(mu);
                done[i] = 1;
            }
            ready.notify_all();
        }
        std::lock_guard<std::mutex> lock(mu);
        --running;
        ready.notify_all();
    };
    const size_t nt = std::min(size_t(std::max(1, num_threads)), n);  // none for an empty batch
    running = nt;
    if (nt) WorkerPool::get().submit(nt, &work);
    auto wait_all = [&] {
        std::unique_lock<std::mutex> lock(mu);
        ready.wait(lock, [&] { return running == 0; });
    };
    try {
        size_t begin = 0;
        while (begin < n) {
            size_t end = begin;
            {
                std::unique_lock<std::mutex> lock(mu);
                ready.wait(lock, [&] { return done[begin] != 0; });
                while (end < n && done[end]) ++end;
            }
            if (stop) throw std::bad_alloc();
            consume(begin, end, out);
            begin = end;
        }
    } catch (...) {
        stop = true;
        wait_all();
        throw;
    }
    wait_all();
}

size_t Encoder::count_ordinary(std::string_view text) const {
    std::vector<Rank> buf;  // a fresh vector, as encode_to_numpy uses
    encode_ordinary(text, buf);
    return buf.size();
}

// ---------------------------------------------------------------------------------------------
// Encoder: decoding
// ---------------------------------------------------------------------------------------------

size_t Encoder::copy_token(uint64_t id, char* dst) const {
    if (id >= n_vocab_ || dec_[id].len == kNoToken) throw UnknownToken(id);
    std::memcpy(dst, dec_arena_.data() + dec_[id].off, dec_[id].len);
    return dec_[id].len;
}

std::string Encoder::token_bytes(uint64_t id) const {
    if (id >= n_vocab_ || dec_[id].len == kNoToken) throw UnknownToken(id);
    return std::string(dec_arena_.data() + dec_[id].off, dec_[id].len);
}

// ---------------------------------------------------------------------------------------------
// Training
// ---------------------------------------------------------------------------------------------

namespace {
// Calls fn(segment) for each stretch of `text` between occurrences of `specials`.
template <class F>
void cut_specials(std::string_view text, const std::vector<std::string>& specials, F&& fn) {
    size_t pos = 0;
    while (pos <= text.size()) {
        size_t best = std::string_view::npos, best_len = 0;
        for (auto& sp : specials) {
            size_t f = text.find(sp, pos);
            if (f != std::string_view::npos && (f < best || (f == best && sp.size() > best_len))) {
                best = f;
                best_len = sp.size();
            }
        }
        if (best == std::string_view::npos) {
            if (pos < text.size()) fn(text.substr(pos));
            return;
        }
        if (best > pos) fn(text.substr(pos, best - pos));
        pos = best + best_len;
    }
}
}  // namespace

PieceCounts count_pieces(const std::vector<std::string_view>& texts, const std::vector<std::string>& specials,
                         int num_threads) {
    size_t nt = size_t(std::max(1, num_threads));
    nt = std::max<size_t>(1, std::min(nt, texts.size()));
    std::vector<std::unordered_map<std::string_view, uint64_t>> maps(nt);
    std::atomic<size_t> next{0};
    auto work = [&](size_t t) {
        auto& m = maps[t];
        for (;;) {
            size_t i = next.fetch_add(1);
            if (i >= texts.size()) return;
            cut_specials(texts[i], specials, [&](std::string_view seg) {
                split_gpt2(seg, [&](size_t b, size_t e) { ++m[seg.substr(b, e - b)]; });
            });
        }
    };
    std::vector<std::thread> threads;
    for (size_t t = 1; t < nt; ++t) threads.emplace_back(work, t);
    work(0);
    for (auto& t : threads) t.join();
    for (size_t t = 1; t < nt; ++t) {
        for (auto& kv : maps[t]) maps[0][kv.first] += kv.second;
        maps[t].clear();
    }
    std::vector<std::pair<std::string_view, uint64_t>> items(maps[0].begin(), maps[0].end());
    maps[0].clear();
    std::sort(items.begin(), items.end());
    PieceCounts out;
    out.pieces.reserve(items.size());
    out.counts.reserve(items.size());
    for (auto& kv : items) {
        out.pieces.emplace_back(kv.first);
        out.counts.push_back(kv.second);
    }
    return out;
}

namespace {
inline uint64_t pair_key(uint32_t a, uint32_t b) { return (uint64_t(a) << 32) | b; }

struct Candidate {
    int64_t count;
    uint32_t a, b;
};
}  // namespace

std::vector<std::string> train_bpe(const PieceCounts& corpus, size_t num_merges,
                                   const std::function<void(size_t)>& progress) {
    std::vector<std::string> vocab(256);
    for (int b = 0; b < 256; ++b) vocab[b] = std::string(1, char(b));
    std::unordered_map<std::string, uint32_t> id_of;
    for (uint32_t b = 0; b < 256; ++b) id_of[vocab[b]] = b;

    const size_t nw = corpus.pieces.size();
    std::vector<std::vector<uint32_t>> words(nw);
    std::vector<int64_t> wcount(nw);
    std::unordered_map<uint64_t, int64_t> counts;
    std::unordered_map<uint64_t, std::vector<uint32_t>> where;
    for (size_t w = 0; w < nw; ++w) {
        const std::string& s = corpus.pieces[w];
        words[w].assign(reinterpret_cast<const uint8_t*>(s.data()), reinterpret_cast<const uint8_t*>(s.data()) + s.size());
        wcount[w] = int64_t(corpus.counts[w]);
        for (size_t i = 0; i + 1 < s.size(); ++i) {
            uint64_t k = pair_key(words[w][i], words[w][i + 1]);
            counts[k] += wcount[w];
            auto& lst = where[k];
            if (lst.empty() || lst.back() != w) lst.push_back(uint32_t(w));
        }
    }
    // Best first: the highest count, then the smallest (bytes(a), bytes(b)).
    auto worse = [&](const Candidate& x, const Candidate& y) {
        if (x.count != y.count) return x.count < y.count;
        int c = vocab[x.a].compare(vocab[y.a]);
        if (c != 0) return c > 0;
        return vocab[x.b].compare(vocab[y.b]) > 0;
    };
    std::priority_queue<Candidate, std::vector<Candidate>, decltype(worse)> heap(worse);
    for (auto& kv : counts)
        if (kv.second > 0) heap.push(Candidate{kv.second, uint32_t(kv.first >> 32), uint32_t(kv.first)});

    std::vector<std::string> merged;
    std::vector<uint32_t> stamp(nw, 0);
    uint32_t step = 0;
    std::unordered_map<uint64_t, int64_t> delta;
    std::vector<uint32_t> tmp;
    while (merged.size() < num_merges && !heap.empty()) {
        Candidate c = heap.top();
        heap.pop();
        const uint64_t key = pair_key(c.a, c.b);
        auto it = counts.find(key);
        if (it == counts.end() || it->second != c.count) continue;  // stale
        std::string bytes = vocab[c.a] + vocab[c.b];
        uint32_t id;
        auto found = id_of.find(bytes);
        if (found != id_of.end()) {
            id = found->second;
        } else {
            id = uint32_t(vocab.size());
            vocab.push_back(bytes);
            id_of.emplace(bytes, id);
            merged.push_back(bytes);
        }
        ++step;
        delta.clear();
        std::vector<uint32_t> lst;
        lst.swap(where[key]);
        where.erase(key);
        for (uint32_t w : lst) {
            if (stamp[w] == step) continue;
            stamp[w] = step;
            auto& word = words[w];
            const int64_t wc = wcount[w];
            bool has = false;
            for (size_t i = 0; i + 1 < word.size(); ++i)
                if (word[i] == c.a && word[i + 1] == c.b) {
                    has = true;
                    break;
                }
            if (!has) continue;
            for (size_t i = 0; i + 1 < word.size(); ++i) delta[pair_key(word[i], word[i + 1])] -= wc;
            tmp.clear();
            for (size_t i = 0; i < word.size();) {
                if (i + 1 < word.size() && word[i] == c.a && word[i + 1] == c.b) {
                    tmp.push_back(id);
                    i += 2;
                } else {
                    tmp.push_back(word[i]);
                    ++i;
                }
            }
            word.swap(tmp);
            for (size_t i = 0; i + 1 < word.size(); ++i) {
                uint64_t k = pair_key(word[i], word[i + 1]);
                delta[k] += wc;
                if (word[i] == id || word[i + 1] == id) {
                    auto& l = where[k];
                    if (l.empty() || l.back() != w) l.push_back(w);
                }
            }
        }
        for (auto& kv : delta) {
            if (kv.second == 0) continue;
            int64_t& cnt = counts[kv.first];
            cnt += kv.second;
            if (cnt > 0) {
                heap.push(Candidate{cnt, uint32_t(kv.first >> 32), uint32_t(kv.first)});
            } else {
                counts.erase(kv.first);
            }
        }
        if (progress && (step % 64 == 0)) progress(merged.size());
    }
    if (progress) progress(merged.size());
    return merged;
}

}  // namespace gptfast
