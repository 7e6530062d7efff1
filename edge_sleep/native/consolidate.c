/* The night's consolidation kernel for one weight tensor, fused (see edge_sleep/native/__init__.py).
 *
 * Significance s = F * w * w is never stored: every pass recomputes it from F and w, which costs
 * two multiplies and saves a full-size temporary. A float is turned into an unsigned key with the
 * same order (flip the sign bit of a non-negative float, all bits of a negative one; -0 is made
 * +0 first, as the two compare equal), so an exact k-th smallest value is a radix selection over
 * the key's bits: a histogram of the first digit (the top 16 bits, say), then one of the next
 * digit among the keys in the one bin that holds the k-th, and so on. Two passes for 16-bit
 * digits, whatever the values, ties or their distribution; the apply pass makes three.
 *
 * Ties at the prune key are broken by |w| and then by position. The last histogram pass marks the
 * live weights of the prune bin in a bitmap (an eighth of a byte a weight), so the ties are
 * broken among the marked weights without another pass over the tensor.
 *
 * Every function works on a contiguous slice [0, n) of the tensors; the caller splits the tensor
 * between threads. Counts go to caller-owned arrays, one per thread, that the caller adds up.
 * No function allocates.
 */
#include <stdint.h>
#include <string.h>

#define BLOCK 512 /* a multiple of 64: a block's bits are whole words of the bitmap */
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && !defined(__clang__)
#define VECTOR __attribute__((target_clones("avx2", "default")))
#else
#define VECTOR
#endif

static inline uint32_t bits_of(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return u;
}

static inline float float_of(uint32_t u) {
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}

/* An unsigned key with the order of the floats, branch-free. */
static inline uint32_t key_of(float x) {
    uint32_t u = bits_of(x);
    u &= (uint32_t)0 - (uint32_t)((u & 0x7fffffffu) != 0); /* -0 -> +0 */
    uint32_t neg = (uint32_t)((int32_t)u >> 31);          /* all ones for a negative float */
    return u ^ (neg | 0x80000000u);
}

static inline uint32_t mag_of(float w) {
    return bits_of(w) & 0x7fffffffu; /* |w|; -0 and +0 alike */
}

/* A weight's prune order as one number: its key in the high half, |w|'s bits in the low half. */
static inline uint64_t pair_of(float w, float f) {
    return ((uint64_t)key_of(f * w * w) << 32) | mag_of(w);
}

/* The first digit of each key (key >> shift) and packed histogram increments (1 in the low half,
 * 1 << 32 if live), vectorized; returns how many significances are NaN. */
VECTOR static uint32_t keys_inc(const float *restrict w, const float *restrict f, const uint8_t *restrict mask,
                                int64_t n, int shift, uint32_t *restrict bin, uint64_t *restrict inc) {
    uint32_t nans = 0;
    for (int64_t i = 0; i < n; i++) {
        float s = f[i] * w[i] * w[i];
        nans += (s != s);
        bin[i] = key_of(s) >> shift;
        inc[i] = 1u | ((uint64_t)(mask[i] != 0) << 32);
    }
    return nans;
}

/* Pass 1: one histogram of the keys' first digit (key >> shift) whose counters hold two counts,
 * all weights in the low 32 bits and live ones (mask != 0) in the high 32 bits, so a weight costs
 * one increment (n < 2^32 per slice). Returns the number of NaN significances (refused). */
int64_t es_hist_first(const float *w, const float *f, const uint8_t *mask, int64_t n, int shift, uint64_t *h) {
    uint32_t bin[BLOCK];
    uint64_t inc[BLOCK];
    int64_t nans = 0;
    for (int64_t a = 0; a < n; a += BLOCK) {
        int64_t m = n - a < BLOCK ? n - a : BLOCK;
        nans += keys_inc(w + a, f + a, mask + a, m, shift, bin, inc);
        for (int64_t i = 0; i < m; i++) h[bin[i]] += inc[i];
    }
    return nans;
}

/* For each weight, the histogram slot of the next digit: the digit ((key >> dshift) & dmask) where
 * the weight is live with prefix `p_alive` (key >> pshift), else one of 8 spare slots past the
 * digits, by position, so that runs of misses do not queue on one counter (vectorized). Bit 0 of
 * the result says whether any weight has prefix `p_alive`, bit 1 whether any has `p_all`. */
VECTOR static uint32_t slots(const float *restrict w, const float *restrict f, const uint8_t *restrict mask,
                             int64_t n, int pshift, uint32_t p_alive, uint32_t p_all, int dshift, uint32_t dmask,
                             uint32_t *restrict key, uint32_t *restrict slot) {
    uint32_t hit1 = 0, hit2 = 0;
    for (int64_t i = 0; i < n; i++) {
        uint32_t k = key_of(f[i] * w[i] * w[i]);
        uint32_t take = ((k >> pshift) == p_alive) & (mask[i] != 0);
        key[i] = k;
        slot[i] = take ? (k >> dshift) & dmask : dmask + 1 + ((uint32_t)i & 7);
        hit1 |= take;
        hit2 |= (k >> pshift) == p_all;
    }
    return (hit1 != 0) | ((uint32_t)(hit2 != 0) << 1);
}

/* Later passes: among keys whose top bits (key >> pshift, 1 <= pshift <= 31) equal a prefix, the
 * histogram of the next digit ((key >> dshift) & dmask): live weights with prefix `p_alive` into
 * h_alive (which has 8 spare slots past the digits, see slots()), all weights with prefix `p_all`
 * into h_all (0xFFFFFFFF matches nothing; a rare bin, gathered first). Unless `collect` is NULL,
 * the live weights with prefix `p_alive` get their bit set in it (a zeroed bitmap of the slice). */
void es_hist_next(const float *w, const float *f, const uint8_t *mask, int64_t n, int pshift, uint32_t p_alive,
                  uint32_t p_all, int dshift, uint32_t dmask, uint64_t *collect, uint32_t *h_alive,
                  uint32_t *h_all) {
    uint32_t key[BLOCK], slot[BLOCK], d[BLOCK];
    for (int64_t a = 0; a < n; a += BLOCK) {
        int64_t m = n - a < BLOCK ? n - a : BLOCK;
        uint32_t hit = slots(w + a, f + a, mask + a, m, pshift, p_alive, p_all, dshift, dmask, key, slot);
        if (hit & 2) { /* the strengthening bin */
            int64_t c = 0;
            for (int64_t i = 0; i < m; i++) {
                d[c] = (key[i] >> dshift) & dmask;
                c += (key[i] >> pshift) == p_all;
            }
            for (int64_t j = 0; j < c; j++) h_all[d[j]]++;
        }
        if (!(hit & 1)) continue;
        if (!collect) {
            for (int64_t i = 0; i < m; i++) h_alive[slot[i]]++;
            continue;
        }
        for (int64_t i0 = 0; i0 < m; i0 += 64) { /* the bitmap word by word, beside the counts */
            uint64_t bits = 0;
            int64_t e = m - i0 < 64 ? m - i0 : 64;
            for (int64_t b = 0; b < e; b++) {
                uint32_t sl = slot[i0 + b];
                h_alive[sl]++;
                bits |= (uint64_t)(sl <= dmask) << b;
            }
            collect[(a + i0) / 64] = bits;
        }
    }
}

/* The candidates (bits of live weights in the prune bin) narrowed, in place, to those whose key
 * equals `key`, and the histogram of their |w|'s top bits (mag >> dshift); returns how many are
 * left. */
int64_t es_keep_key(const float *w, const float *f, uint64_t *bits, int64_t nwords, uint32_t key, int dshift,
                    uint32_t *h) {
    int64_t c = 0;
    for (int64_t wd = 0; wd < nwords; wd++) {
        uint64_t kept = 0;
        for (uint64_t x = bits[wd]; x; x &= x - 1) {
            int b = __builtin_ctzll(x);
            int64_t i = wd * 64 + b;
            if (key_of(f[i] * w[i] * w[i]) == key) {
                kept |= (uint64_t)1 << b;
                h[mag_of(w[i]) >> dshift]++;
                c++;
            }
        }
        bits[wd] = kept;
    }
    return c;
}

/* Among the candidates whose |w| bits have this prefix (mag >> pshift, pshift <= 32), the
 * histogram of a digit of |w| ((mag >> dshift) & dmask). */
void es_hist_mag_at(const float *w, const uint64_t *bits, int64_t nwords, int pshift, uint32_t prefix, int dshift,
                    uint32_t dmask, uint32_t *h) {
    for (int64_t wd = 0; wd < nwords; wd++) {
        for (uint64_t x = bits[wd]; x; x &= x - 1) {
            uint32_t g = mag_of(w[wd * 64 + __builtin_ctzll(x)]);
            if ((uint32_t)((uint64_t)g >> pshift) == prefix) h[(g >> dshift) & dmask]++;
        }
    }
}

/* The r-th (1-based) marked weight in index order whose key is `key` and |w| bits `mag`: its slice
 * index, or -1 when there are fewer; *count gets how many there are. */
int64_t es_nth_pair_at(const float *w, const float *f, const uint64_t *bits, int64_t nwords, uint32_t key,
                       uint32_t mag, int64_t r, int64_t *count) {
    const uint64_t want = ((uint64_t)key << 32) | mag;
    int64_t c = 0, at = -1;
    for (int64_t wd = 0; wd < nwords; wd++) {
        for (uint64_t x = bits[wd]; x; x &= x - 1) {
            int64_t i = wd * 64 + __builtin_ctzll(x);
            if (pair_of(w[i], f[i]) == want && ++c == r) at = i;
        }
    }
    *count = c;
    return at;
}

/* The |w| bits of the candidates whose |w| bits have this prefix (mag >> pshift, pshift <= 32), in
 * index order, into out while they fit in `cap`; returns how many there are. */
int64_t es_gather_mag_at(const float *w, const uint64_t *bits, int64_t nwords, int pshift, uint32_t prefix,
                         uint32_t *out, int64_t cap) {
    int64_t c = 0;
    for (int64_t wd = 0; wd < nwords; wd++) {
        for (uint64_t x = bits[wd]; x; x &= x - 1) {
            uint32_t g = mag_of(w[wd * 64 + __builtin_ctzll(x)]);
            if ((uint32_t)((uint64_t)g >> pshift) == prefix) {
                if (c < cap) out[c] = g;
                c++;
            }
        }
    }
    return c;
}

/* The r-th (1-based) candidate in index order whose |w| bits equal `mag`: its slice index, or -1
 * when there are fewer; *count gets how many there are. */
int64_t es_nth_mag_at(const float *w, const uint64_t *bits, int64_t nwords, uint32_t mag, int64_t r,
                      int64_t *count) {
    int64_t c = 0, at = -1;
    for (int64_t wd = 0; wd < nwords; wd++) {
        for (uint64_t x = bits[wd]; x; x &= x - 1) {
            int64_t i = wd * 64 + __builtin_ctzll(x);
            if (mag_of(w[i]) == mag && ++c == r) at = i;
        }
    }
    *count = c;
    return at;
}

/* A sample: `runs` runs of `len` weights starting at starts[r]; the keys of all of them into keys
 * (runs * len) and the pairs (pair_of) of the live ones, in the same order, into live_pairs;
 * returns how many are live. */
int64_t es_sample_keys(const float *w, const float *f, const uint8_t *mask, const int64_t *starts, int64_t runs,
                       int64_t len, uint32_t *keys, uint64_t *live_pairs) {
    int64_t c = 0;
    for (int64_t r = 0; r < runs; r++) {
        const int64_t a = starts[r];
        for (int64_t i = 0; i < len; i++) {
            uint64_t v = pair_of(w[a + i], f[a + i]);
            keys[r * len + i] = (uint32_t)(v >> 32);
            live_pairs[c] = v;
            c += mask[a + i] != 0;
        }
    }
    return c;
}

/* How many of the n mask entries are live (vectorized). */
int64_t es_count_live(const uint8_t *mask, int64_t n) {
    int64_t c = 0;
    for (int64_t i = 0; i < n; i++) c += mask[i] != 0;
    return c;
}

/* Flags of one block for the bracket pass (vectorized). The prune bracket is one of pairs (key,
 * |w| bits), compared in that order, from (lo_p, lo_pm) to (hi_p, hi_pm); the strengthening one of
 * keys. fp[i] = live and in the prune bracket, fs[i] = lo_s <= key <= hi_s; counts into c[0..4]
 * (live below the prune bracket, live in it, all below lo_s, all in the strengthening bracket,
 * NaN significances). */
VECTOR static void bracket_flags(const float *restrict w, const float *restrict f, const uint8_t *restrict mask,
                                 int64_t n, uint32_t lo_p, uint32_t lo_pm, uint32_t hi_p, uint32_t hi_pm,
                                 uint32_t lo_s, uint32_t hi_s, uint8_t *restrict fp, uint8_t *restrict fs,
                                 uint32_t *restrict c) {
    uint32_t bp = 0, ip = 0, bs = 0, is = 0, nans = 0;
    for (int64_t i = 0; i < n; i++) {
        float wi = w[i];
        float s = f[i] * wi * wi;
        uint32_t k = key_of(s), g = mag_of(wi);
        uint32_t live = mask[i] != 0;
        uint32_t under = (k < lo_p) | ((k == lo_p) & (g < lo_pm));
        uint32_t over = (k > hi_p) | ((k == hi_p) & (g > hi_pm));
        uint32_t in_p = live & ((under | over) ^ 1u);
        uint32_t in_s = (k >= lo_s) & (k <= hi_s);
        bp += live & under;
        ip += in_p;
        bs += k < lo_s;
        is += in_s;
        nans += s != s;
        fp[i] = (uint8_t)in_p;
        fs[i] = (uint8_t)in_s;
    }
    c[0] += bp;
    c[1] += ip;
    c[2] += bs;
    c[3] += is;
    c[4] += nans;
}

/* Eight 0/1 bytes as eight bits, the first byte in bit 0 (one multiply; no carries cross, since
 * each product bit gets at most one term). */
static inline uint64_t pack8(const uint8_t *p) {
    uint64_t x;
    memcpy(&x, p, sizeof x);
    return (x * 0x0102040810204080ULL) >> 56;
}

/* 0/1 flags as a bitmap: word i0 / 64 gets flags i0 .. i0 + 63, flag b in bit b. */
static void flags_to_bits(const uint8_t *fl, int64_t n, uint64_t *word) {
    for (int64_t i0 = 0; i0 < n; i0 += 64) {
        int64_t e = n - i0 < 64 ? n - i0 : 64;
        uint64_t bits = 0;
        if (e == 64) {
            for (int j = 0; j < 8; j++) bits |= pack8(fl + i0 + 8 * j) << (8 * j);
        } else {
            for (int64_t b = 0; b < e; b++) bits |= (uint64_t)fl[i0 + b] << b;
        }
        word[i0 / 64] = bits;
    }
}

/* The keys (or, for `pairs`, the pairs) of the flagged weights (set bits of `bits`, nw words of a
 * block), appended to out[have..] while they fit in `cap`; returns how many there are in all.
 * Reads only the flagged weights. */
static int64_t gather_keys(const float *w, const float *f, const uint64_t *bits, int64_t nw, uint32_t *keys,
                           uint64_t *pairs, int64_t have, int64_t cap) {
    for (int64_t wd = 0; wd < nw; wd++) {
        for (uint64_t x = bits[wd]; x; x &= x - 1) {
            int64_t i = wd * 64 + __builtin_ctzll(x);
            if (have < cap) {
                uint64_t v = pair_of(w[i], f[i]);
                if (pairs) {
                    pairs[have] = v;
                } else {
                    keys[have] = (uint32_t)(v >> 32);
                }
            }
            have++;
        }
    }
    return have;
}

/* The bracket pass: counts (see bracket_flags) into out[0..4], the flags as bitmaps bits_p and
 * bits_s, and, unless NULL, the pairs of the weights in the prune bracket into pairs_p and the
 * keys of those in the strengthening bracket into keys_s, while they fit (cap_p, cap_s). */
void es_bracket(const float *w, const float *f, const uint8_t *mask, int64_t n, uint32_t lo_p, uint32_t lo_pm,
                uint32_t hi_p, uint32_t hi_pm, uint32_t lo_s, uint32_t hi_s, uint64_t *bits_p, uint64_t *bits_s,
                uint64_t *pairs_p, int64_t cap_p, uint32_t *keys_s, int64_t cap_s, int64_t *out) {
    uint8_t fp[BLOCK], fs[BLOCK];
    uint32_t c[5] = {0, 0, 0, 0, 0};
    int64_t np_ = 0, ns_ = 0;
    for (int64_t a = 0; a < n; a += BLOCK) {
        int64_t m = n - a < BLOCK ? n - a : BLOCK;
        uint32_t before_p = c[1], before_s = c[3];
        bracket_flags(w + a, f + a, mask + a, m, lo_p, lo_pm, hi_p, hi_pm, lo_s, hi_s, fp, fs, c);
        flags_to_bits(fp, m, bits_p + a / 64);
        flags_to_bits(fs, m, bits_s + a / 64);
        int64_t nw = (m + 63) / 64;
        if (pairs_p && c[1] != before_p) {
            np_ = gather_keys(w + a, f + a, bits_p + a / 64, nw, NULL, pairs_p, np_, cap_p);
        }
        if (keys_s && c[3] != before_s) {
            ns_ = gather_keys(w + a, f + a, bits_s + a / 64, nw, keys_s, NULL, ns_, cap_s);
        }
        if (a % (BLOCK * 4096) == 0) { /* flush the 32-bit counters well before they could wrap */
            for (int j = 0; j < 5; j++) out[j] += c[j], c[j] = 0;
        }
    }
    for (int j = 0; j < 5; j++) out[j] += c[j];
}

/* Among the marked weights whose key has this prefix (key >> pshift, pshift <= 32), the histogram
 * of a digit of the key ((key >> dshift) & dmask). */
void es_hist_key_at(const float *w, const float *f, const uint64_t *bits, int64_t nwords, int pshift,
                    uint32_t prefix, int dshift, uint32_t dmask, uint32_t *h) {
    for (int64_t wd = 0; wd < nwords; wd++) {
        for (uint64_t x = bits[wd]; x; x &= x - 1) {
            int64_t i = wd * 64 + __builtin_ctzll(x);
            uint32_t k = key_of(f[i] * w[i] * w[i]);
            if ((uint32_t)((uint64_t)k >> pshift) == prefix) h[(k >> dshift) & dmask]++;
        }
    }
}

/* The keys of the marked weights whose key has this prefix (key >> pshift, pshift <= 32), into out
 * while they fit in `cap`; returns how many there are. */
int64_t es_gather_key_at(const float *w, const float *f, const uint64_t *bits, int64_t nwords, int pshift,
                         uint32_t prefix, uint32_t *out, int64_t cap) {
    int64_t c = 0;
    for (int64_t wd = 0; wd < nwords; wd++) {
        for (uint64_t x = bits[wd]; x; x &= x - 1) {
            int64_t i = wd * 64 + __builtin_ctzll(x);
            uint32_t k = key_of(f[i] * w[i] * w[i]);
            if ((uint32_t)((uint64_t)k >> pshift) == prefix) {
                if (c < cap) out[c] = k;
                c++;
            }
        }
    }
    return c;
}

/* The fused apply pass, in place and branch-free. A live weight is pruned when its significance
 * key is below `p_key`, or equal to it with |w|'s bits below `mag_bound` (the caller splits the
 * tensor where ties in both are decided by position). A kept weight with a key above `s_key` is
 * multiplied by `scale`; a pruned weight becomes +0 and its mask 0.
 * out[0] += pruned, out[1] += strengthened. */
VECTOR void es_apply(float *restrict w, const float *restrict f, uint8_t *restrict mask, int64_t n,
                     uint32_t p_key, uint32_t mag_bound, uint32_t s_key, float scale, int64_t *out) {
    uint32_t pruned = 0, strong = 0;
    for (int64_t i = 0; i < n; i++) {
        float wi = w[i];
        uint32_t k = key_of(f[i] * wi * wi);
        uint32_t m = mag_of(wi);
        uint32_t live = mask[i] != 0;
        uint32_t cut = live & ((k < p_key) | ((k == p_key) & (m < mag_bound)));
        uint32_t keep = live & (cut ^ 1u);
        uint32_t up = keep & (k > s_key);
        pruned += cut;
        strong += up;
        mask[i] = (uint8_t)keep;
        uint32_t upm = (uint32_t)0 - up, keepm = (uint32_t)0 - keep;
        uint32_t v = (bits_of(wi * scale) & upm) | (bits_of(wi) & ~upm);
        w[i] = float_of(v & keepm);
    }
    out[0] += pruned;
    out[1] += strong;
}
