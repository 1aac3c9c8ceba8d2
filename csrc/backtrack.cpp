// Long pieces, left to right: the merge rule's result without replaying its merges.
//
// Replaying the merges of a long piece in rank order (bpe_heap) jumps around the whole piece and
// misses the cache on nearly every merge. This encoder walks the piece once, left to right,
// choosing tokens and checking each against the one before it. It rests on three facts about a
// "proper" vocabulary, one where the merge rule, encoding any token's bytes alone, produces that
// token, and the two tokens it joins last (the token's canonical split) both rank below it:
//
// 1. Ranks only grow: every merge creates a token ranked above the tokens it joins, so the pairs a
//    merge creates rank above it and the rule performs its merges in non-decreasing rank order.
// 2. A pair of tokens (a, b) is "valid" when the rule, given the bytes of a then b, gives back
//    exactly [a, b]. Whether it does depends only on how the right edge of a and the left edge of
//    b grew over time (see `valid` below), which the canonical splits describe.
// 3. A sequence of tokens whose adjacent pairs are all valid is the rule's result for its bytes:
//    if the rule ever joined across a boundary, the first such join would also happen to that
//    boundary's pair alone, which is then not valid. So the result is the only such sequence.
//
// The encoder therefore looks for a sequence of valid pairs: at each position it tries the
// longest token that the bytes start with, then shorter ones, and backs up when no token fits.
// By fact 3 the tokens before a position are always the same when it is reached, so a position
// from which nothing fits is marked dead once and never tried again: the walk is near-linear.
// Vocabularies that are not proper (checked when the tables are built) use bpe_heap instead.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <exception>
#include <system_error>
#include <thread>

#include "bpe.h"

namespace gptfast {

namespace {
constexpr uint32_t kNone = 0xFFFFFFFFu;

inline unsigned popcount(uint64_t x) {
#if defined(__GNUC__) && defined(__POPCNT__)
    return unsigned(__builtin_popcountll(x));
#else
    x -= (x >> 1) & 0x5555555555555555ull;
    x = (x & 0x3333333333333333ull) + ((x >> 2) & 0x3333333333333333ull);
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0Full;
    return unsigned((x * 0x0101010101010101ull) >> 56);
#endif
}

// Open-addressing map from 32-bit keys (never all ones) to 32-bit values: the trie's edges
// (node << 8 | byte) while the trie is built.
class EdgeMap {
  public:
    void reserve(size_t n) {  // load factor at most 5/8
        size_t cap = 16;
        while (cap * 5 < n * 8) cap <<= 1;
        slots_.assign(cap, Slot{kEmpty, kNone});
        mask_ = cap - 1;
    }
    void put(uint32_t k, uint32_t v) {
        size_t i = slot(k);
        while (slots_[i].key != kEmpty && slots_[i].key != k) i = (i + 1) & mask_;
        slots_[i] = Slot{k, v};
    }
    uint32_t get(uint32_t k) const {
        for (size_t i = slot(k);; i = (i + 1) & mask_) {
            const Slot& s = slots_[i];
            if (s.key == k) return s.val;
            if (s.key == kEmpty) return kNone;
        }
    }

  private:
    static constexpr uint32_t kEmpty = ~uint32_t(0);
    struct Slot {
        uint32_t key, val;
    };
    size_t slot(uint32_t k) const { return size_t((uint64_t(k) * 0x9E3779B97F4A7C15ull) >> 29) & mask_; }
    std::vector<Slot> slots_;
    size_t mask_ = 0;
};

// (left, right) -> token, for ids below 2^20, in 8-byte slots (a 40-bit key and a 24-bit value),
// at a load factor of at most 3/4: for GPT-2's merges, 512 KB.
class PairMap {
  public:
    static constexpr uint32_t kMaxId = 1u << 20;
    void reserve(size_t n) {
        size_t cap = 16;
        while (cap * 3 < n * 4) cap <<= 1;
        slots_.assign(cap, kEmpty);
        mask_ = cap - 1;
    }
    void put(uint32_t a, uint32_t b, uint32_t v) {
        const uint64_t k = key(a, b);
        size_t i = slot(k);
        while (slots_[i] != kEmpty && slots_[i] >> 24 != k) i = (i + 1) & mask_;
        slots_[i] = k << 24 | v;
    }
    uint32_t get(uint32_t a, uint32_t b) const {
        const uint64_t k = key(a, b);
        for (size_t i = slot(k);; i = (i + 1) & mask_) {
            const uint64_t s = slots_[i];
            if (s >> 24 == k) return uint32_t(s & 0xFFFFFF);
            if (s == kEmpty) return kNone;
        }
    }

  private:
    static constexpr uint64_t kEmpty = ~uint64_t(0);  // its key, 2^40 - 1, is no pair of ids below 2^20
    static uint64_t key(uint32_t a, uint32_t b) { return uint64_t(a) << 20 | b; }
    size_t slot(uint64_t k) const { return size_t(((k ^ (k >> 29)) * 0x9E3779B97F4A7C15ull) >> 29) & mask_; }
    std::vector<uint64_t> slots_;
    size_t mask_ = 0;
};

// A one-hash filter in front of the PairMap: small enough to stay in cache, it answers most
// lookups of absent pairs without touching the map.
class KeyFilter {
  public:
    void reserve(size_t n, size_t bits_per_key) {
        shift_ = 64 - 16;
        while ((size_t(1) << (64 - shift_)) < bits_per_key * n) --shift_;
        words_.assign((size_t(1) << (64 - shift_)) / 64, 0);
    }
    void add(uint64_t k) {
        const size_t h = bit(k);
        words_[h >> 6] |= uint64_t(1) << (h & 63);
    }
    bool maybe(uint64_t k) const {
        const size_t h = bit(k);
        return (words_[h >> 6] >> (h & 63)) & 1;
    }

  private:
    size_t bit(uint64_t k) const {  // the top bits of a multiplicative hash
        k ^= k >> 29;
        return size_t((k * 0xD6E8FEB86659FD93ull) >> shift_);
    }
    std::vector<uint64_t> words_;
    unsigned shift_ = 48;
};
}  // namespace

struct Encoder::LongTables {
    bool proper = false;
    struct Tok {           // what the walk needs of a token, in one 16-byte record
        uint32_t left, right;  // canonical split; for a single byte, left is kNone and right the byte
                               // (both kNone for unusable ids)
        uint32_t shorter;      // the longest usable token that is a proper prefix, or kNone
        uint16_t length;       // bytes
        uint16_t number;       // 1 + its row in `number_valid` for a token of ASCII digits only, or 0
    };
    std::vector<Tok> tok;
    // Whether each pair of number tokens (ASCII digits only; the first 1023 by id) is valid, a bit a
    // pair, computed for all of them when the tables are built (number_pairs below, about a
    // millisecond for GPT-2's 994). A run of digits is the long piece the pattern makes most often,
    // and over those few tokens it asks about hundreds of thousands of distinct pairs, each costing
    // a few steps of `valid` the first time. A token's row is in its Tok record.
    uint32_t number_rows = 0;
    size_t number_words = 0;  // 64-bit words a row
    std::vector<uint64_t> number_valid;
    bool number_pair_valid(uint32_t na, uint32_t nb) const {
        return (number_valid[size_t(na - 1) * number_words + (nb - 1) / 64] >> ((nb - 1) & 63)) & 1;
    }
    void number_pairs();
    std::vector<uint32_t> number_ids() const {  // row -> token
        std::vector<uint32_t> id_of(number_rows);
        for (uint32_t id = 0; id < tok.size(); ++id)
            if (tok[id].number) id_of[tok[id].number - 1] = id;
        return id_of;
    }
    // (left, right) -> the token they are the canonical split of, behind a filter (most pairs
    // asked about are not there).
    PairMap pairs;
    KeyFilter pair_filter;

    uint32_t pair(uint32_t r, uint32_t l) const {
        return pair_filter.maybe(uint64_t(r) << 32 | l) ? pairs.get(r, l) : kNone;
    }
    // Two single bytes, the pair asked about most, are looked up directly.
    std::vector<uint32_t> byte_pair;  // (byte0 << 8 | byte1) -> their 2-byte token, or kNone

    // A byte trie of the usable tokens. A node where a token ends is numbered by that token's id,
    // any other node from n_vocab up, so a node tells which token ends there without a lookup.
    // Nodes at depth 1 and 2 are found by direct indexing. Below that, each node that has children
    // keeps a bitmap of the bytes that continue it, and its children lie side by side in byte
    // order, so a child is found by counting bits. The records are laid out breadth first from the
    // depth-2 nodes, so those of one prefix lie together and a walk over ordinary text keeps a
    // small working set (a hash map of edges would spread one node's edges over the whole table).
    size_t n_vocab = 0;
    uint32_t root_child[256];
    struct Node {
        uint32_t node;  // or kNone
        uint32_t kids;  // index into `kids`, or kNone when no token continues
    };
    std::vector<Node> depth2;  // (byte0 << 8 | byte1) -> node
    struct Kids {
        uint64_t bits[4];   // the bytes that continue the node
        uint32_t first;     // its children in `child`, in byte order, from here
        uint8_t before[4];  // set bits in bits[0, i)
    };
    std::vector<Kids> kids;
    std::vector<Node> child;

    // Whether the rule, given the bytes of a then b, keeps them as [a, b]. The right edge of a
    // (its last part as it grew) and the left edge of b are followed back in time; each pair of
    // edges that coexisted could have joined, and it does if its rank falls while both exist.
    bool valid(uint32_t a, uint32_t b) const {
        uint32_t r = a, l = b;
        uint64_t r_end = ~uint64_t(0), l_end = ~uint64_t(0);  // when r and l were replaced (never)
        for (;;) {
            const bool r_byte = tok[r].left == kNone, l_byte = tok[l].left == kNone;
            const uint32_t c = r_byte && l_byte ? byte_pair[tok[r].right << 8 | tok[l].right] : pair(r, l);
            if (c != kNone) {
                const uint64_t until = std::min(r_end, l_end);
                if (c < until) return false;
                // The same rank as the merge that replaced l, which lies to the right: the rule
                // takes the leftmost pair first, so the join across wins.
                if (c == until && l_end < r_end) return false;
            }
            if (r_byte && l_byte) return true;
            // Step back past the later of the two merges that made r and l. With equal ranks
            // (the same token on both sides) the right one was made second.
            // Written to select rather than branch: which side steps back is data, not a pattern.
            const bool step_r = !r_byte && (l_byte || r > l);
            const uint32_t r_next = tok[r].right, l_next = tok[l].left;
            r_end = step_r ? uint64_t(r) : r_end;
            l_end = step_r ? l_end : uint64_t(l);
            r = step_r ? r_next : r;
            l = step_r ? l : l_next;
        }
    }

    // A valid sequence of tokens known for the bytes from `begin` on, and a cursor over it.
    struct Tail {
        const LongTables& t;
        const Rank* tokens;
        size_t count, begin;
        size_t i = 0, at;  // tokens[i] starts at byte `at`
        Tail(const LongTables& tables, const Rank* ids, size_t n, size_t from)
            : t(tables), tokens(ids), count(n), begin(from), at(from) {}
        // The index of the token starting at `pos` (count at the end), or kNone. The walk moves
        // forward, with short steps back, so the cursor does too.
        size_t token_at(size_t pos) {
            while (at < pos && i < count) at += t.tok[tokens[i++]].length;
            while (at > pos && i > 0) at -= t.tok[tokens[--i]].length;
            return at == pos ? i : kNone;
        }
    };
    enum class Walk { kDone, kJoined, kStuck };
    Walk walk(const uint8_t* p, size_t n, uint32_t prev, std::vector<Rank>& out, Tail* tail, size_t* joined) const;

    // The longest usable token that p[0, n) starts with (a single byte always is one).
    uint32_t longest(const uint8_t* p, size_t n) const {
        uint32_t best = root_child[p[0]];
        if (n < 2) return best;
        const Node d2 = depth2[size_t(p[0]) << 8 | p[1]];
        if (d2.node == kNone) return best;
        if (d2.node < n_vocab) best = d2.node;
        for (size_t i = 2, at = d2.kids; i < n && at != kNone; ++i) {
            const Kids& k = kids[at];
            const unsigned b = p[i];
            const uint64_t word = k.bits[b >> 6];
            if (!((word >> (b & 63)) & 1)) break;  // most walks end on a byte no token continues with
            const Node c = child[k.first + k.before[b >> 6] + popcount(word & ((uint64_t(1) << (b & 63)) - 1))];
            if (c.node < n_vocab) best = c.node;
            at = c.kids;
        }
        return best;
    }
};

Encoder::LongSlot::LongSlot() = default;
Encoder::LongSlot::~LongSlot() = default;

bool Encoder::split_of(Rank id, Rank* left, Rank* right) const {
    if (id >= n_vocab_ || dec_[id].len == kNoToken || dec_[id].len < 2) return false;
    const uint8_t* p = reinterpret_cast<const uint8_t*>(dec_arena_.data() + dec_[id].off);
    const size_t n = dec_[id].len;
    for (const auto& sp : specials_)
        if (sp.second == id) return false;
    // The merge rule on the token's bytes alone, stopped when two parts are left.
    std::vector<uint32_t> st(n + 1);  // part i is [st[i], st[i + 1])
    std::vector<Rank> rk(n);          // rk[i]: rank of parts i and i + 1 joined
    for (size_t i = 0; i <= n; ++i) st[i] = uint32_t(i);
    for (size_t i = 0; i + 1 < n; ++i) rk[i] = find(p + i, 2);
    while (st.size() > 3) {
        const size_t parts = st.size() - 1;
        size_t bi = 0;
        for (size_t i = 1; i + 1 < parts; ++i)
            if (rk[i] < rk[bi]) bi = i;
        if (rk[bi] == kNoRank) return false;  // the rule gets stuck: it never produces this token
        st.erase(st.begin() + long(bi) + 1);
        rk.erase(rk.begin() + long(bi) + 1);
        // The merged part's pairs with its neighbours.
        if (bi + 2 < st.size()) rk[bi] = find(p + st[bi], st[bi + 2] - st[bi]);
        if (bi > 0) rk[bi - 1] = find(p + st[bi - 1], st[bi + 1] - st[bi - 1]);
    }
    *left = find(p, st[1]);
    *right = find(p + st[1], n - st[1]);
    return *left != kNoRank && *right != kNoRank;
}

const Encoder::LongTables* Encoder::long_tables() const {
    std::call_once(long_->once, [this] {
        auto t = std::make_unique<LongTables>();
        const size_t nv = n_vocab_;
        t->tok.assign(nv, LongTables::Tok{kNone, kNone, kNone, 0, 0});
        std::vector<uint8_t> usable(nv, 0);
        std::vector<uint8_t> special(nv, 0);
        for (const auto& sp : specials_) special[sp.second] = 1;
        bool proper = nv < PairMap::kMaxId;
        size_t count = 0;
        for (size_t id = 0; id < nv; ++id) {
            if (dec_[id].len == kNoToken || special[id]) continue;
            if (dec_[id].len > 0xFFFF) proper = false;
            t->tok[id].length = uint16_t(dec_[id].len);
            if (dec_[id].len == 1) {
                t->tok[id].right = uint8_t(dec_arena_[dec_[id].off]);
                usable[id] = 1;
                continue;
            }
            Rank a, b;
            if (!split_of(Rank(id), &a, &b)) continue;  // never produced by the rule: never a candidate
            if (!(a < id && b < id)) proper = false;
            t->tok[id].left = a;
            t->tok[id].right = b;
            usable[id] = 1;
            ++count;
        }
        for (int byte = 0; byte < 256; ++byte)
            if (byte_rank_[byte] == kNoRank || usable[byte_rank_[byte]] == 0) proper = false;
        t->proper = proper;
        if (proper) {
            for (size_t id = 0; id < nv && t->number_rows < 1023; ++id) {
                if (!usable[id]) continue;
                const char* q = dec_arena_.data() + dec_[id].off;
                bool digits = true;
                for (size_t i = 0; i < dec_[id].len; ++i) digits = digits && q[i] >= '0' && q[i] <= '9';
                if (digits) t->tok[id].number = uint16_t(++t->number_rows);
            }
            t->byte_pair.assign(65536, kNone);
            size_t of_bytes = 0;
            for (size_t id = 0; id < nv; ++id) {
                const uint32_t a = t->tok[id].left, b = t->tok[id].right;
                if (a != kNone && t->tok[a].left == kNone && t->tok[b].left == kNone) {
                    t->byte_pair[t->tok[a].right << 8 | t->tok[b].right] = uint32_t(id);
                    ++of_bytes;
                }
            }
            t->pair_filter.reserve(count - of_bytes, 16);
            t->pairs.reserve(count - of_bytes);
            for (size_t id = 0; id < nv; ++id)
                if (t->tok[id].left != kNone && t->tok[id].length > 2) {
                    t->pairs.put(t->tok[id].left, t->tok[id].right, uint32_t(id));
                    t->pair_filter.add(uint64_t(t->tok[id].left) << 32 | t->tok[id].right);
                }
            // The trie, and each token's longest usable proper prefix. Tokens go in shortest first,
            // so a token's own node is new when it is added and can take the token's id.
            t->n_vocab = nv;
            for (int byte = 0; byte < 256; ++byte) t->root_child[byte] = byte_rank_[byte];
            t->depth2.assign(65536, LongTables::Node{kNone, kNone});
            std::vector<uint32_t> order;
            for (size_t id = 0; id < nv; ++id)
                if (usable[id] && t->tok[id].length >= 2) order.push_back(uint32_t(id));
            std::stable_sort(order.begin(), order.end(),
                             [&](uint32_t x, uint32_t y) { return t->tok[x].length < t->tok[y].length; });
            size_t deep = 0;  // an upper bound on the edges below depth 2
            for (const uint32_t id : order) deep += t->tok[id].length - 2;
            EdgeMap building;
            building.reserve(deep);
            std::vector<std::pair<uint32_t, uint32_t>> edges;  // (node << 8 | byte, node), below depth 2
            uint32_t next_inner = uint32_t(nv);
            for (const uint32_t id : order) {
                const uint8_t* p = reinterpret_cast<const uint8_t*>(dec_arena_.data() + dec_[id].off);
                const size_t len = t->tok[id].length;
                uint32_t& second = t->depth2[size_t(p[0]) << 8 | p[1]].node;
                if (len == 2) {
                    second = id;
                    continue;
                }
                if (second == kNone) second = next_inner++;
                uint32_t node = second;
                for (size_t i = 2; i < len && next_inner < (uint32_t(1) << 24) - 1; ++i) {
                    const uint32_t key = node << 8 | p[i];
                    uint32_t next = building.get(key);
                    if (next == kNone) {
                        next = i + 1 == len ? id : next_inner++;
                        building.put(key, next);
                        edges.emplace_back(key, next);
                    }
                    node = next;
                }
            }
            if (next_inner >= (uint32_t(1) << 24) - 1) {
                t->proper = false;  // too many nodes for 32-bit keys: use the merge rule directly
            } else {
                // Each node's edges, in byte order; records handed out breadth first.
                std::sort(edges.begin(), edges.end());
                std::vector<uint32_t> start(next_inner, kNone), count(next_inner, 0), kids_of(next_inner, kNone);
                for (size_t e = 0; e < edges.size(); ++e) {
                    const uint32_t parent = edges[e].first >> 8;
                    if (start[parent] == kNone) start[parent] = uint32_t(e);
                    ++count[parent];
                }
                std::vector<uint32_t> queue;
                for (const auto& d2 : t->depth2)
                    if (d2.node != kNone && count[d2.node]) queue.push_back(d2.node);
                for (size_t q = 0; q < queue.size(); ++q) {
                    const uint32_t node = queue[q];
                    LongTables::Kids k{{0, 0, 0, 0}, uint32_t(t->child.size()), {0, 0, 0, 0}};
                    for (uint32_t e = start[node]; e < start[node] + count[node]; ++e) {
                        const unsigned b = edges[e].first & 0xFF;
                        k.bits[b >> 6] |= uint64_t(1) << (b & 63);
                        for (unsigned w = (b >> 6) + 1; w < 4; ++w) ++k.before[w];
                        t->child.push_back(LongTables::Node{edges[e].second, kNone});
                        if (count[edges[e].second]) queue.push_back(edges[e].second);
                    }
                    kids_of[node] = uint32_t(t->kids.size());
                    t->kids.push_back(k);
                }
                for (auto& c : t->child) c.kids = kids_of[c.node];
                for (auto& d2 : t->depth2)
                    if (d2.node != kNone) d2.kids = kids_of[d2.node];
            }
            for (size_t id = 0; id < nv; ++id) {
                if (!usable[id] || t->tok[id].length < 2) continue;
                const uint8_t* p = reinterpret_cast<const uint8_t*>(dec_arena_.data() + dec_[id].off);
                t->tok[id].shorter = t->longest(p, t->tok[id].length - 1);
            }
            t->number_pairs();
        }
        long_->tables = std::move(t);
        long_->ready.store(true, std::memory_order_release);
    });
    return long_->tables.get();
}

const char* Encoder::long_piece_method() const { return long_tables()->proper ? "backtrack" : "merge"; }

// `valid` for every pair of number tokens at once. `valid` follows the right edge of a and the left
// edge of b back in time and finds the pair invalid exactly when two parts that coexisted, r on
// a's edge and l on b's, have a merge c = (r, l) ranked below the merge that replaced r (its
// parent on a's edge; never, for a itself) and not above the one that replaced l (at equal ranks
// the leftmost pair goes first). So each such merge c makes invalid every pair (a, b) with r on
// a's right edge, replaced after c, and l on b's left edge, replaced at or after c: a set of rows
// times a set of columns. Parts of a number token are number tokens of lower id, so they have rows.
void Encoder::LongTables::number_pairs() {
    const uint32_t rows = number_rows;
    number_words = (rows + 63) / 64;
    number_valid.assign(size_t(rows) * number_words, 0);
    if (rows == 0) return;
    const std::vector<uint32_t> id_of = number_ids();
    // Every part on the edges of a token with a row must have one too; if one did not (a part the
    // rule never produces on its own), the walk checks number tokens one pair at a time instead.
    for (uint32_t i = 0; i < rows; ++i)
        for (uint32_t side = 0; side < 2; ++side)
            for (uint32_t x = id_of[i]; tok[x].left != kNone; x = side ? tok[x].left : tok[x].right)
                if (!tok[side ? tok[x].left : tok[x].right].number) {
                    for (const uint32_t id : id_of) tok[id].number = 0;
                    number_rows = 0;
                    number_words = 0;
                    number_valid.clear();
                    return;
                }
    // The merges of two number tokens (by their rows), whatever the merged token's own row.
    std::vector<std::vector<uint32_t>> by_left(rows), by_right(rows);  // merge ids, ascending
    uint32_t merges = 0;
    std::vector<uint32_t> merge_index(tok.size(), kNone);
    for (uint32_t id = 0; id < tok.size(); ++id) {
        if (tok[id].left == kNone) continue;
        const uint32_t x = tok[tok[id].left].number, y = tok[tok[id].right].number;
        if (!x || !y) continue;
        by_left[x - 1].push_back(id);
        by_right[y - 1].push_back(id);
        merge_index[id] = merges++;
    }
    std::vector<std::vector<uint32_t>> row_sets(merges);                  // merge -> rows a
    std::vector<uint64_t> col_sets(size_t(merges) * number_words, 0);    // merge -> columns b
    for (uint32_t i = 0; i < rows; ++i) {
        uint64_t end = ~uint64_t(0);  // when the part was replaced (never, for the token itself)
        for (uint32_t r = id_of[i];; end = r, r = tok[r].right) {
            for (const uint32_t c : by_left[tok[r].number - 1])
                if (c < end) row_sets[merge_index[c]].push_back(i);
            if (tok[r].left == kNone) break;
        }
        end = ~uint64_t(0);
        for (uint32_t l = id_of[i];; end = l, l = tok[l].left) {
            for (const uint32_t c : by_right[tok[l].number - 1])
                if (c <= end) col_sets[size_t(merge_index[c]) * number_words + i / 64] |= uint64_t(1) << (i & 63);
            if (tok[l].left == kNone) break;
        }
    }
    std::vector<uint64_t> invalid(size_t(rows) * number_words, 0);
    for (uint32_t m = 0; m < merges; ++m)
        for (const uint32_t i : row_sets[m])
            for (size_t w = 0; w < number_words; ++w)
                invalid[size_t(i) * number_words + w] |= col_sets[size_t(m) * number_words + w];
    for (size_t w = 0; w < invalid.size(); ++w) number_valid[w] = ~invalid[w];
}

size_t Encoder::check_number_pairs(size_t* pairs) const {
    const LongTables& t = *long_tables();
    const std::vector<uint32_t> id_of = t.number_ids();
    size_t wrong = 0;
    for (uint32_t i = 0; i < t.number_rows; ++i)
        for (uint32_t j = 0; j < t.number_rows; ++j)
            wrong += t.valid(id_of[i], id_of[j]) != t.number_pair_valid(i + 1, j + 1);
    *pairs = size_t(t.number_rows) * t.number_rows;
    return wrong;
}

namespace {
std::atomic<unsigned> g_piece_threads{1};
std::atomic<size_t> g_min_segment{size_t(1) << 16};
}  // namespace

thread_local bool t_batch_worker = false;

void Encoder::set_long_piece_threads(unsigned threads) { g_piece_threads = std::max(1u, threads); }
unsigned Encoder::long_piece_threads() { return g_piece_threads; }
void Encoder::set_long_piece_segment(size_t min_bytes) { g_min_segment = std::max<size_t>(1, min_bytes); }
size_t Encoder::long_piece_segment() { return g_min_segment; }

namespace {
// The answers of `valid` for the pairs of the first kSide distinct tokens a walk asks about, two
// bits each, for pairs that are not both number tokens (those have a table of their own). A long
// piece over a small alphabet asks about the same pairs of its few tokens again and again; with
// more distinct tokens than this, pairs repeat less and a larger table would crowd the walk's own
// tables out of the cache, so the walk stops using it.
struct PairMemo {
    static constexpr uint32_t kSide = 1024;
    static constexpr size_t kMinPiece = 4096;  // shorter pieces repeat too little to pay for it
    std::vector<uint16_t> number;  // token -> 1 + its row here, or 0
    std::vector<uint32_t> rows;    // the tokens with a row, in order
    std::vector<uint8_t> state;    // pair (row a, row b): 0 not known, 1 invalid, 2 valid
    bool on = false;
    void start(size_t n_vocab, bool use) {
        on = use;
        if (!use && rows.empty()) return;
        for (const uint32_t x : rows) {  // clear only what the last walk used
            std::memset(&state[size_t(number[x] - 1) * kSide / 4], 0, kSide / 4);
            number[x] = 0;
        }
        rows.clear();
        if (number.size() != n_vocab) number.assign(n_vocab, 0);  // another vocabulary
        state.resize(size_t(kSide) * kSide / 4);
    }
    uint32_t row(uint32_t x) {
        if (number[x] == 0) {
            if (rows.size() == kSide) {
                on = false;
                return 0;
            }
            rows.push_back(x);
            number[x] = uint16_t(rows.size());
        }
        return number[x];
    }
};
}  // namespace

// The walk: appends to `out` the tokens of p[0, n), the first of which must pair validly with
// `prev` (kNone: nothing before). Returns kStuck, leaving `out` as it was, when no such sequence
// exists (only possible with a `prev`).
//
// With a `tail`, a valid sequence already known for p[tail->begin, n), it stops as soon as a token
// it places ends where a tail token starts and the two pair validly: what it placed, followed by
// the rest of the tail, is then a sequence of valid pairs, so by fact 3 it is the result, and
// `*joined` says which tail token comes next. This is how segments encoded apart are joined.
Encoder::LongTables::Walk Encoder::LongTables::walk(const uint8_t* p, size_t n, uint32_t prev, std::vector<Rank>& out,
                                                    Tail* tail, size_t* joined) const {
    thread_local std::vector<uint64_t> dead;  // positions from which no valid sequence continues
    dead.assign(n / 64 + 1, 0);
    auto is_dead = [&](size_t i) { return (dead[i >> 6] >> (i & 63)) & 1; };
    const size_t base = out.size();
    thread_local PairMemo memo;
    memo.start(n_vocab, n >= PairMemo::kMinPiece);
    auto pair_ok = [&](uint32_t a, uint32_t b) {
        const uint32_t na = tok[a].number, nb = tok[b].number;
        if (na && nb) return number_pair_valid(na, nb);
        if (!memo.on) return valid(a, b);
        const uint32_t ra = memo.row(a), rb = memo.row(b);
        if (!memo.on) return valid(a, b);
        const size_t at = size_t(ra - 1) * PairMemo::kSide + (rb - 1);
        uint8_t& cell = memo.state[at >> 2];
        const unsigned shift = unsigned(at & 3) * 2, known = (cell >> shift) & 3;
        if (known) return known == 2;
        const bool v = valid(a, b);
        cell = uint8_t(cell | (v ? 2 : 1) << shift);
        return v;
    };
    size_t pos = 0;
    uint32_t cand = longest(p, n);
    while (pos < n) {
        const uint32_t last = out.size() > base ? out.back() : prev;
        while (cand != kNone) {
            const size_t end = pos + tok[cand].length;
            if (!is_dead(end) && (last == kNone || pair_ok(last, cand))) break;
            cand = tok[cand].shorter;
        }
        if (cand != kNone) {
            out.push_back(cand);
            pos += tok[cand].length;
            if (tail && pos >= tail->begin) {
                const size_t i = tail->token_at(pos);
                if (i != kNone && (i == tail->count || valid(cand, tail->tokens[i]))) {
                    *joined = i;
                    return Walk::kJoined;
                }
            }
            if (pos < n) cand = longest(p + pos, n - pos);
            continue;
        }
        // Nothing fits here: mark the position and take the previous token back.
        dead[pos >> 6] |= uint64_t(1) << (pos & 63);
        if (out.size() == base) return Walk::kStuck;
        cand = tok[out.back()].shorter;
        pos -= tok[out.back()].length;
        out.pop_back();
    }
    return Walk::kDone;
}

// One walk for most pieces. A long piece, where threads are allowed, is cut into segments that
// are walked at the same time, each as if it were a piece of its own; then, left to right, the
// last few tokens before each cut are walked again, joining onto the next segment's tokens (see
// `walk`). If the walk again from a point cannot continue, that point is no token boundary of the
// result, and it starts further back. Joins are exact, and usually settle within a few tokens.
bool Encoder::bpe_backtrack(const uint8_t* p, size_t n, std::vector<Rank>& out) const {
    const LongTables& t = *long_tables();
    if (!t.proper) return false;
    const size_t first = out.size();
    const size_t min_segment = g_min_segment;
    const size_t segments = t_batch_worker ? 1 : std::min<size_t>(g_piece_threads, n / min_segment);
    if (segments <= 1) {
        // Stuck without a token before it: not possible for a proper vocabulary; safe regardless.
        if (t.walk(p, n, kNone, out, nullptr, nullptr) == LongTables::Walk::kStuck) bpe_heap(p, n, out);
        return true;
    }
    std::vector<size_t> cut(segments + 1);
    for (size_t k = 0; k <= segments; ++k) cut[k] = n / segments * k;
    cut[segments] = n;
    std::vector<std::vector<Rank>> part(segments);
    std::vector<std::exception_ptr> error(segments);
    auto encode_segment = [&](size_t k) {
        try {
            std::vector<Rank>& dst = k == 0 ? out : part[k];
            if (t.walk(p + cut[k], cut[k + 1] - cut[k], kNone, dst, nullptr, nullptr) == LongTables::Walk::kStuck)
                bpe_heap(p + cut[k], cut[k + 1] - cut[k], dst);
        } catch (...) {
            error[k] = std::current_exception();
        }
    };
    {
        std::vector<std::thread> threads;
        std::vector<size_t> here{0};  // segments this thread encodes (all, if no thread can start)
        for (size_t k = 1; k < segments; ++k) {
            try {
                threads.emplace_back(encode_segment, k);
            } catch (const std::system_error&) {
                here.push_back(k);
            }
        }
        for (const size_t k : here) encode_segment(k);
        for (auto& th : threads) th.join();
    }
    for (const auto& e : error)
        if (e) std::rethrow_exception(e);
    std::vector<Rank> again;
    for (size_t k = 1; k < segments; ++k) {
        // out[first, end) is the result for p[0, cut[k]); part[k] that for p[cut[k], cut[k + 1]).
        const std::vector<Rank>& next = part[k];
        const size_t have = out.size() - first;
        for (size_t back = 8;; back *= 2) {
            const size_t drop = std::min(back, have);
            size_t from = cut[k];
            for (size_t i = out.size() - drop; i < out.size(); ++i) from -= t.tok[out[i]].length;
            const uint32_t prev = drop < have ? out[out.size() - drop - 1] : kNone;
            LongTables::Tail tail(t, next.data(), next.size(), cut[k] - from);
            again.clear();
            size_t joined = next.size();
            const auto how = t.walk(p + from, cut[k + 1] - from, prev, again, &tail, &joined);
            if (how == LongTables::Walk::kStuck) {
                if (drop < have) continue;  // `from` is no boundary: start further back
                // Stuck at the start of the piece: not possible for a proper vocabulary.
                out.resize(first);
                bpe_heap(p, cut[k + 1], out);
                break;
            }
            out.resize(out.size() - drop);
            out.insert(out.end(), again.begin(), again.end());
            if (how == LongTables::Walk::kJoined) out.insert(out.end(), next.begin() + long(joined), next.end());
            break;
        }
    }
    return true;
}

}  // namespace gptfast
