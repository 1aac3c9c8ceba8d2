// Timing harness for the BPE core, without Python.
//
// Build (from the repository root; -O3 only, as the wheel is built):
//     g++ -O3 -std=c++17 -Icsrc -o /tmp/bpe_bench tools/bpe_bench.cpp csrc/backtrack.cpp -lpthread
// It includes csrc/bpe.cpp itself (found on the include path), so the splitter's internal functions
// can be timed alone; -I<dir> in place of -Icsrc, a folder with another version's bpe.cpp, bpe.h and
// unicode_tables.h, times that version (git show <rev>:csrc/bpe.cpp > <dir>/bpe.cpp, and so on).
//
// Run:
//     /tmp/bpe_bench CORPUS OFFSETS [MODE] [RANKS]
// CORPUS is a file of documents laid end to end; OFFSETS lists their byte offsets, one a line (the
// first 0, the last the file's size). RANKS defaults to gptfast/assets/r50k_base.tiktoken (run from the
// repository root).
// The documents are dealt into 8 slices (document i to slice i % 8). MODE:
//     core    (default) ns/byte of Encoder::encode_ordinary_into: cold (slice 1 in this fresh
//             process), steady (slices 2..8, text the process has not seen), repeated (slice 8 again)
//     split   ns/byte of the splitter alone over the whole corpus: piece_end per piece, and the block
//             splitter where bpe.cpp has one; best of 5
//     verify  the block splitter's pieces against piece_end's, on the corpus and on random texts, and
//             hash_short against hash_bytes on random short pieces
//             (build with -fsanitize=address,undefined as well: each text is checked in a buffer of
//             exactly its size)
#include "bpe.cpp"

#include <chrono>
#include <cstdio>
#include <fstream>
#include <random>
#include <sstream>

using namespace gptfast;

namespace {

std::string read_file(const char* path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) {
        std::fprintf(stderr, "cannot read %s\n", path);
        std::exit(2);
    }
    std::ostringstream ss;
    ss << f.rdbuf();
    return ss.str();
}

double now_s() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

size_t g_sink = 0;

size_t split_old(std::string_view t) {
    const uint8_t* s = reinterpret_cast<const uint8_t*>(t.data());
    const size_t n = t.size();
    size_t sum = 0;
    for (size_t pos = 0; pos < n;) {
        pos = piece_end(s, n, pos);
        sum += pos;
    }
    return sum;
}

#ifdef GPTFAST_BLOCK_SPLITTER
size_t split_block(std::string_view t) {
    BlockSplitter sp(reinterpret_cast<const uint8_t*>(t.data()), t.size());
    PieceStarts c;
    size_t sum = 0;
    for (size_t pos = 0; pos < t.size();) {
        pos = sp.next(c, pos);
        sum += pos;
    }
    return sum;
}

bool same_pieces(std::string_view t) {
    // a copy of exactly its size, so that a sanitizer build sees any read past the end
    const size_t n = t.size();
    std::unique_ptr<uint8_t[]> copy(new uint8_t[n ? n : 1]);
    std::memcpy(copy.get(), t.data(), n);
    const uint8_t* s = copy.get();
    BlockSplitter sp(s, n);
    PieceStarts c;
    for (size_t pos = 0; pos < n;) {
        const size_t a = piece_end(s, n, pos), b = sp.next(c, pos);
        if (a != b) {
            std::fprintf(stderr, "at %zu: piece_end %zu, block %zu\n", pos, a, b);
            return false;
        }
        pos = a;
    }
    return true;
}
#endif

}  // namespace

int main(int argc, char** argv) {
    if (argc < 3) {
        std::fprintf(stderr, "usage: %s CORPUS OFFSETS [core|split|verify] [RANKS]\n", argv[0]);
        return 2;
    }
    const std::string corpus = read_file(argv[1]);
    std::vector<size_t> offs;
    {
        std::istringstream in(read_file(argv[2]));
        size_t v;
        while (in >> v) offs.push_back(v);
    }
    const std::string mode = argc > 3 ? argv[3] : "core";
    const char* ranks_path = argc > 4 ? argv[4] : "gptfast/assets/r50k_base.tiktoken";
    std::vector<std::string_view> docs;
    for (size_t i = 0; i + 1 < offs.size(); ++i)
        docs.emplace_back(corpus.data() + offs[i], offs[i + 1] - offs[i]);
    constexpr size_t kSlices = 8;
    std::vector<std::vector<std::string_view>> slices(kSlices);
    for (size_t i = 0; i < docs.size(); ++i) slices[i % kSlices].push_back(docs[i]);

    if (mode == "split") {
        double best_old = 1e9, best_new = 1e9;
        for (int rep = 0; rep < 5; ++rep) {
            double t0 = now_s();
            for (auto d : docs) g_sink += split_old(d);
            best_old = std::min(best_old, now_s() - t0);
#ifdef GPTFAST_BLOCK_SPLITTER
            t0 = now_s();
            for (auto d : docs) g_sink += split_block(d);
            best_new = std::min(best_new, now_s() - t0);
#endif
        }
        std::printf("split piece_end %.3f ns/byte\n", best_old * 1e9 / corpus.size());
#ifdef GPTFAST_BLOCK_SPLITTER
        std::printf("split block     %.3f ns/byte\n", best_new * 1e9 / corpus.size());
#endif
        std::fprintf(stderr, "(%zu)\n", g_sink);
        return 0;
    }
    if (mode == "verify") {
#ifdef GPTFAST_BLOCK_SPLITTER
        size_t bad = 0;
        for (unsigned c = 0; c < 128; ++c) {  // the masks' classes against the byte table
            uint8_t blk[64];
            std::memset(blk, 0, sizeof blk);
            blk[c % 64] = uint8_t(c);
            BlockClasses k;
            block_classes(blk, &k);
            const uint64_t bit = uint64_t(1) << (c % 64);
            const uint8_t cls = kBytes.cls[c];
            if (bool(k.letter & bit) != (cls == kLetter) || bool(k.number & bit) != (cls == kNumber) ||
                bool(k.space & bit) != (cls == kSpace) || bool(k.blank & bit) != (c == ' ') ||
                bool(k.apos & bit) != (c == '\'') || high_bytes(blk) != 0) {
                std::printf("byte %u: masks differ from the class table\n", c);
                ++bad;
            }
        }
        for (auto d : docs) bad += !same_pieces(d);
        std::printf("corpus: %zu documents differ\n", bad);
        {  // the second level's hash of a short piece from its key, against the hash of its bytes
            std::mt19937_64 hr(11);
            size_t hbad = 0;
            for (int k = 0; k < 100000; ++k) {
                uint8_t piece[15];
                const size_t n = 1 + hr() % 15;
                for (size_t i = 0; i < n; ++i) piece[i] = uint8_t(hr());
                uint64_t k0, k1;
                small_key(piece, n, piece + n, &k0, &k1);
                hbad += hash_short(k0, k1 & ~(uint64_t(0xFF) << 56), n) != hash_bytes(piece, n, load_head(piece, n));
            }
            std::printf("hash_short: %zu of 100000 short pieces differ from hash_bytes\n", hbad);
            bad += hbad;
        }
        std::mt19937_64 rng(7);
        const std::vector<std::string> alphabet = {
            "a", "b", "s", "t", "l", "v", "e", "r", "d", "m", "X", "Z", "0", "7", " ", " ", " ", "\n", "\t",
            "\r", "\x0b", "'", "'", "?", "!", ".", "_", "-", "\xc3\xa9", "\xe6\x97\xa5", "\xc2\xa0",
            "\xe2\x80\xa8", "\x85", "\xff", "\x1c", std::string(1, '\0')};
        size_t rbad = 0;
        auto check = [&](const std::string& t) {  // counts a text whose pieces differ; shows the first few
            if (same_pieces(t) || ++rbad >= 5) return;
            std::fprintf(stderr, "random text differs:");
            for (unsigned char c : t) std::fprintf(stderr, " %02x", c);
            std::fprintf(stderr, "\n");
        };
        for (int k = 0; k < 300000; ++k) {
            const size_t len = rng() % 300;
            std::string t;
            while (t.size() < len) t += alphabet[rng() % alphabet.size()];
            check(t);
        }
        // mostly ASCII, so that blocks chain and resume after the odd longer character
        const std::string ascii = "aaaabcdeeeeillmmrrssttvvXZ0099      \n\n\t\r\x0b\x0c\x1c\x1f'''''?!.-_#";
        for (int k = 0; k < 300000; ++k) {
            const size_t len = rng() % 700;
            std::string t;
            const unsigned rare = unsigned(rng() % 4);  // 0: ASCII only
            while (t.size() < len) {
                if (rare && rng() % (100 * rare) == 0)
                    t += alphabet[28 + rng() % (alphabet.size() - 28)];
                else
                    t += ascii[rng() % ascii.size()];
            }
            check(t);
        }
        // mostly longer characters, so that they cross block boundaries: letters, marks and digits of
        // 2 and 3 bytes, which the blocks read, and what they leave to piece_end (whitespace that is
        // not ASCII, 4-byte characters, bytes that are not UTF-8)
        const std::vector<std::string> in_blocks = {
            "\xd0\xbf", "\xd1\x80", "\xd0\x98", "\xd2\x82", "\xd2\x83", "\xd9\xa3", "\xc2\xb2", "\xc2\xab",
            "\xc3\xa9", "\xe0\xa4\x95", "\xe0\xa4\xbf", "\xe0\xa5\xa6", "\xe2\x80\x9c", "\xe2\x80\x94",
            "\xe6\x97\xa5", "\xef\xbc\x91", "a", "s", "'", "'", "7", " ", " ", " ", "\n", ".", "-"};
        const std::vector<std::string> left_out = {
            "\xe3\x80\x80", "\xc2\xa0", "\xc2\x85", "\xe2\x80\xa8", "\xf0\x9f\x98\x80", "\xc0\x80", "\xe0\x80\x80",
            "\xed\xa0\x80", "\xe6\x97", "\xe6", "\xd0", "\x85", "\xbf", "\xf5", "\xff"};
        for (int k = 0; k < 300000; ++k) {
            const size_t len = rng() % 500;
            // the share of left_out: as many as the others, none, or rarely (so that such bytes fall
            // inside blocks that are read, at their ends too)
            const unsigned mix = unsigned(rng() % 3);
            std::string t;
            while (t.size() < len) {
                const bool out = mix == 0 ? rng() % 3 == 0 : mix == 2 && rng() % 40 == 0;
                t += out ? left_out[rng() % left_out.size()] : in_blocks[rng() % in_blocks.size()];
            }
            check(t);
        }
        std::printf("random: %zu texts differ\n", rbad);
        return bad || rbad;
#else
        std::printf("this bpe.cpp has no block splitter\n");
        return 0;
#endif
    }

    const std::string ranks_file = read_file(ranks_path);
    Encoder enc(Encoder::parse_tiktoken(ranks_file), {});
    size_t longest = 0;
    for (auto d : docs) longest = std::max(longest, d.size());
    std::vector<Rank> buf(longest + Encoder::kOutSlack);
    auto run = [&](const std::vector<std::string_view>& part, size_t* bytes) {
        const double t0 = now_s();
        size_t ids = 0;
        for (auto d : part) {
            ids += enc.encode_ordinary_into(d, buf.data());
            *bytes += d.size();
        }
        g_sink += ids;
        return now_s() - t0;
    };
    size_t b_cold = 0, b_steady = 0, b_rep = 0;
    const double t_cold = run(slices[0], &b_cold);
    double t_steady = 0;
    for (size_t k = 1; k < kSlices; ++k) t_steady += run(slices[k], &b_steady);
    const double t_rep = run(slices[kSlices - 1], &b_rep);
    std::printf("core cold %.3f steady %.3f repeated %.3f ns/byte\n", t_cold * 1e9 / b_cold,
                t_steady * 1e9 / b_steady, t_rep * 1e9 / b_rep);
    std::fprintf(stderr, "(%zu)\n", g_sink);
    return 0;
}
