/* SAP's bitmap hot paths as fused C / OpenMP loops (FedMef §3.4; bitmap format of App. 7.1).

   common/nn/bitkernels.py compiles this file on first use and calls it through ctypes; its module
   docstring says why these loops exist and how the build is cached. Bits are MSB-first within each
   byte, as common/sparse/bits.py packs them, and every function gives bit-identical results to the
   torch code it replaces (tests/test_bitkernels.py).

   A Flower app bundle carries no .c files, so bitkernels.c.json holds a copy of this text for the
   ClientApps that get their code from one: run `make kernels` after editing this file. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 4096 /* bitmap bytes (32768 elements) per parallel block */

/* Per byte value: its eight bits as all-ones / all-zero 32-bit lanes; the offsets of its set bits
   (MSB first, padded with 0); and for each bit the number of set bits before it. The last two make
   gather and scatter branch-free: every byte moves eight floats, and the pointers advance by the
   popcount. */
static uint32_t lanes[256][8];
static uint8_t set_offsets[256][8];
static uint8_t rank_before[256][8];
/* For a reference byte r and a byte m: pext8[r][m] = the bits of m at r's set bits, in order, in the
   low popcount(r) bits (the first set bit of r the highest); pdep8[r][v] puts them back. They move a
   byte per step in the relative bitmaps below (a portable PEXT / PDEP: ARM has neither). */
static uint8_t pext8[256][256];
static uint8_t pdep8[256][256];

__attribute__((constructor)) static void init_tables(void) {
    for (int b = 0; b < 256; b++) {
        int seen = 0;
        for (int j = 0; j < 8; j++) {
            int bit = (b >> (7 - j)) & 1;
            lanes[b][j] = bit ? 0xFFFFFFFFu : 0u;
            rank_before[b][j] = (uint8_t)seen;
            set_offsets[b][j] = 0;
            if (bit) seen++;
        }
        seen = 0;
        for (int j = 0; j < 8; j++)
            if ((b >> (7 - j)) & 1) set_offsets[b][seen++] = (uint8_t)j;
    }
    for (int r = 0; r < 256; r++) {
        int count = __builtin_popcount(r);
        for (int v = 0; v < 256; v++) {
            unsigned extracted = 0, deposited = 0;
            for (int j = 0, k = 0; j < 8; j++) {
                if (!((r >> (7 - j)) & 1)) continue;
                extracted = extracted << 1 | ((v >> (7 - j)) & 1u);
                deposited |= ((v >> (count - 1 - k)) & 1u) << (7 - j);
                k++;
            }
            pext8[r][v] = (uint8_t)extracted;
            pdep8[r][v] = (uint8_t)(deposited & 0xFFu);
        }
    }
}

int64_t fm_block_elements(void) { return 8 * BLOCK; } /* sizes fm_select_above's counts */

static int64_t block_count(int64_t nbytes) { return (nbytes + BLOCK - 1) / BLOCK; }
static int64_t block_end(int64_t k, int64_t nbytes) { return k * BLOCK + BLOCK < nbytes ? k * BLOCK + BLOCK : nbytes; }

/* start[k] = set bits of bitmap before block k, start[nb] = all of them (malloc'd: the caller frees). */
static int64_t *block_starts(const uint8_t *bitmap, int64_t nbytes, int64_t nb) {
    int64_t *start = malloc(sizeof(int64_t) * (nb + 1));
    start[0] = 0;
    #pragma omp parallel for schedule(static)
    for (int64_t k = 0; k < nb; k++) {
        int64_t c = 0;
        for (int64_t b = k * BLOCK, end = block_end(k, nbytes); b < end; b++) c += __builtin_popcount(bitmap[b]);
        start[k + 1] = c;
    }
    for (int64_t k = 0; k < nb; k++) start[k + 1] += start[k];
    return start;
}

/* start[k] = the sum of counts before block k (fm_select_above's counts; malloc'd: the caller frees). */
static int64_t *count_starts(const int64_t *counts, int64_t nb) {
    int64_t *start = malloc(sizeof(int64_t) * (nb + 1));
    start[0] = 0;
    for (int64_t k = 0; k < nb; k++) start[k + 1] = start[k] + counts[k];
    return start;
}

/* Bit (7 - j) of bitmap[b] = |x[8b + j]| > t; counts[k] = bits set in block k; returns the total. */
int64_t fm_select_above(const float *x, int64_t n, float t, uint8_t *bitmap, int64_t *counts) {
    int64_t nbytes = (n + 7) / 8, nb = block_count(nbytes), whole = n / 8, total = 0;
    #pragma omp parallel for schedule(static) reduction(+ : total)
    for (int64_t k = 0; k < nb; k++) {
        int64_t end = block_end(k, nbytes), c = 0;
        for (int64_t b = k * BLOCK; b < end; b++) {
            unsigned bits = 0;
            if (b < whole) {
                const float *p = x + 8 * b;
                for (int j = 0; j < 8; j++) bits |= (unsigned)(fabsf(p[j]) > t) << (7 - j);
            } else {
                for (int64_t i = 8 * b; i < n; i++) bits |= (unsigned)(fabsf(x[i]) > t) << (7 - (i - 8 * b));
            }
            bitmap[b] = (uint8_t)bits;
            c += __builtin_popcount(bits);
        }
        counts[k] = c;
        total += c;
    }
    return total;
}

/* values <- x at the set bits, in order; counts as written by fm_select_above. A byte copies eight
   floats and advances by its popcount, the surplus being overwritten by the next byte, wherever
   eight floats fit before the block's share of values ends (past it they belong to another thread);
   the bytes after that copy exactly. */
void fm_gather(const float *x, int64_t n, const uint8_t *bitmap, const int64_t *counts, float *values) {
    int64_t nbytes = (n + 7) / 8, nb = block_count(nbytes);
    int64_t *start = count_starts(counts, nb);
    #pragma omp parallel for schedule(static)
    for (int64_t k = 0; k < nb; k++) {
        float *out = values + start[k], *out_end = values + start[k + 1];
        for (int64_t b = k * BLOCK, end = block_end(k, nbytes); b < end; b++) {
            const float *p = x + 8 * b;
            if (out + 8 <= out_end) {
                const uint8_t *at = set_offsets[bitmap[b]];
                for (int j = 0; j < 8; j++) out[j] = p[at[j]];
                out += __builtin_popcount(bitmap[b]);
                continue;
            }
            for (unsigned bits = bitmap[b]; bits; ) {
                int j = __builtin_clz(bits << 24);
                *out++ = p[j];
                bits &= ~(0x80u >> j);
            }
        }
    }
    free(start);
}

/* out (n floats) <- values at the set bits, 0 elsewhere. Returns the bitmap's popcount; out is
   only written when it equals nnz. */
int64_t fm_scatter(const float *values, int64_t nnz, const uint8_t *bitmap, int64_t n, float *out) {
    int64_t nbytes = (n + 7) / 8, nb = block_count(nbytes);
    int64_t *start = block_starts(bitmap, nbytes, nb), total = start[nb];
    if (total == nnz) {
        #pragma omp parallel for schedule(static)
        for (int64_t k = 0; k < nb; k++) {
            const float *v = values + start[k], *v_end = values + nnz;
            for (int64_t b = k * BLOCK, end = block_end(k, nbytes); b < end; b++) {
                unsigned bits = bitmap[b];
                if (8 * b + 8 <= n && v + 8 <= v_end) {
                    /* out[j] = v[rank of bit j] under the bit's lane, +0.0 elsewhere; the lanes
                       read (never past the values) may belong to the next byte */
                    const uint32_t *m = lanes[bits], *vi = (const uint32_t *)v;
                    const uint8_t *r = rank_before[bits];
                    uint32_t *o = (uint32_t *)(out + 8 * b);
                    for (int j = 0; j < 8; j++) o[j] = vi[r[j]] & m[j];
                    v += __builtin_popcount(bits);
                    continue;
                }
                for (int64_t i = 8 * b, j = 0; i < n && j < 8; i++, j++)
                    out[i] = (bits >> (7 - j)) & 1 ? *v++ : 0.0f;
            }
        }
    }
    free(start);
    return total;
}

/* out = clamp(x, 0, upper) (NaN stays NaN, like torch); bit = 0 < x, and x < upper if capped
   (an uncapped ReLU passes +inf). */
void fm_relu_pack(const float *x, int64_t n, int capped, float upper, float *out, uint8_t *bitmap) {
    int64_t whole = n / 8;
    #pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < whole; b++) {
        const float *p = x + 8 * b;
        float *o = out + 8 * b;
        unsigned bits = 0;
        for (int j = 0; j < 8; j++) {
            float v = p[j];
            bits |= (unsigned)((v > 0.0f) & (!capped | (v < upper))) << (7 - j);
            o[j] = v < 0.0f ? 0.0f : (v > upper ? upper : v);
        }
        bitmap[b] = (uint8_t)bits;
    }
    if (8 * whole < n) {
        unsigned bits = 0;
        for (int64_t i = 8 * whole; i < n; i++) {
            float v = x[i];
            bits |= (unsigned)((v > 0.0f) & (!capped | (v < upper))) << (7 - (i - 8 * whole));
            out[i] = v < 0.0f ? 0.0f : (v > upper ? upper : v);
        }
        bitmap[whole] = (uint8_t)bits;
    }
}

/* out = grad where the bit is set, +0.0 elsewhere (a bitwise select: NaN gradients stay put). */
void fm_mask_grad(const float *grad, const uint8_t *bitmap, int64_t n, float *out) {
    const uint32_t *g = (const uint32_t *)grad;
    uint32_t *o = (uint32_t *)out;
    int64_t whole = n / 8;
    #pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < whole; b++) {
        const uint32_t *m = lanes[bitmap[b]];
        for (int j = 0; j < 8; j++) o[8 * b + j] = g[8 * b + j] & m[j];
    }
    for (int64_t i = 8 * whole; i < n; i++) o[i] = g[i] & lanes[bitmap[whole]][i - 8 * whole];
}

/* Relative bitmaps (common/sparse/codec.py, restrict_bitmap / extend_bitmap): sub holds one bit per
   set bit of ref, in order, MSB-first and zero-padded: sub bit j = bitmap bit i_j, i_j the position
   of the j-th set bit of ref (a bitwise PEXT of the whole stream; the caller lists the set bits
   outside ref). Block k of ref owns sub bits start[k] .. start[k + 1] - 1, which need not begin
   on a byte: the bytes it shares with its neighbours are OR-ed atomically into a zeroed sub, the
   rest stored. */

int64_t fm_popcount(const uint8_t *bitmap, int64_t nbytes) {
    int64_t total = 0;
    #pragma omp parallel for schedule(static) reduction(+ : total)
    for (int64_t b = 0; b < nbytes; b++) total += __builtin_popcount(bitmap[b]);
    return total;
}

static void or_byte(uint8_t *p, unsigned bits) {
    #pragma omp atomic update
    *p |= (uint8_t)bits;
}

/* sub <- bitmap restricted to ref's set bits; sub must be zeroed and hold (popcount(ref) + 7) / 8
   bytes. Returns the number of bitmap bits set where ref's is clear (which sub does not hold). */
int64_t fm_restrict_bits(const uint8_t *bitmap, const uint8_t *ref, int64_t n, uint8_t *sub) {
    int64_t nbytes = (n + 7) / 8, nb = block_count(nbytes), outside = 0;
    int64_t *start = block_starts(ref, nbytes, nb);
    #pragma omp parallel for schedule(static) reduction(+ : outside)
    for (int64_t k = 0; k < nb; k++) {
        /* bits gather MSB-first in acc: its low nacc bits are pending, nacc < 8 between bytes; the
           block's first sub byte begins start[k] % 8 bits in, as zeros for the neighbour's OR */
        int64_t out = start[k] / 8;
        unsigned acc = 0, nacc = (unsigned)(start[k] % 8);
        int first_shared = nacc != 0;
        for (int64_t b = k * BLOCK, end = block_end(k, nbytes); b < end; b++) {
            unsigned r = ref[b], m = bitmap[b];
            outside += __builtin_popcount(m & ~r & 0xFFu);
            acc = acc << __builtin_popcount(r) | pext8[r][m];
            nacc += __builtin_popcount(r);
            if (nacc >= 8) {
                nacc -= 8;
                unsigned byte = (acc >> nacc) & 0xFFu;
                if (first_shared) or_byte(sub + out, byte);
                else sub[out] = (uint8_t)byte;
                first_shared = 0;
                out++;
                acc &= (1u << nacc) - 1u;
            }
        }
        if (nacc) or_byte(sub + out, (acc << (8 - nacc)) & 0xFFu); /* shared with the next block */
    }
    free(start);
    return outside;
}

/* bitmap (nbytes of n bits) <- sub's bits at ref's set bits, 0 elsewhere; the inverse of
   fm_restrict_bits for a bitmap within ref. Returns popcount(ref); bitmap is only written when sub's
   sub_nbytes are exactly (popcount(ref) + 7) / 8. */
int64_t fm_extend_bits(const uint8_t *sub, int64_t sub_nbytes, const uint8_t *ref, int64_t n, uint8_t *bitmap) {
    int64_t nbytes = (n + 7) / 8, nb = block_count(nbytes);
    int64_t *start = block_starts(ref, nbytes, nb), total = start[nb];
    if ((total + 7) / 8 == sub_nbytes) {
        #pragma omp parallel for schedule(static)
        for (int64_t k = 0; k < nb; k++) {
            int64_t p = start[k];
            for (int64_t b = k * BLOCK, end = block_end(k, nbytes); b < end; b++) {
                unsigned r = ref[b], count = __builtin_popcount(r);
                if (!count) {
                    bitmap[b] = 0;
                    continue;
                }
                /* the next count (<= 8) sub bits, from the two bytes that hold them */
                int64_t at = p / 8;
                unsigned window = (unsigned)sub[at] << 8 | (at + 1 < sub_nbytes ? sub[at + 1] : 0u);
                unsigned v = (window >> (16 - p % 8 - count)) & ((1u << count) - 1u);
                bitmap[b] = pdep8[r][v];
                p += count;
            }
        }
    }
    free(start);
    return total;
}

/* SAP's int8 cache (common/nn/sapcache.py) scales each channel by max|x| / 127 of that channel.
   Element i lies in channel (i / inner) % channels: inner = H*W and channels = C for a convolution's
   (N, C, H, W) input, inner = 1 and channels = features for a linear layer's. The three functions
   below fuse the scaling into the passes that select and scatter, so the cache costs what fp32's
   does instead of two more passes over the whole activation; each equals the torch expressions of
   sapcache bit for bit (the same IEEE division, round half to even and product). */

/* amax[c] = max |x_i| over channel c, NaN if one is NaN (as torch's max), 0 with no entries. Slices of
   inner elements reduce in parallel, then fold into their channel. n is a multiple of inner.
   With the sign bit cleared, IEEE floats order as their bit patterns do as unsigned integers, NaNs
   above +inf, so each slice takes an integer maximum: a float max-reduction does not vectorize without
   -ffast-math (NaN and signed-zero rules), and this pass over the whole activation ran at a third of
   the selection's speed. */
void fm_channel_absmax(const float *x, int64_t n, int64_t inner, int64_t channels, float *amax) {
    int64_t slices = inner ? n / inner : 0;
    float *slice_max = malloc(sizeof(float) * (slices ? slices : 1));
    #pragma omp parallel for schedule(static)
    for (int64_t s = 0; s < slices; s++) {
        const uint32_t *p = (const uint32_t *)(x + s * inner);
        uint32_t m = 0;
        for (int64_t i = 0; i < inner; i++) {
            uint32_t a = p[i] & 0x7FFFFFFFu;
            m = a > m ? a : m;
        }
        float f;
        memcpy(&f, &m, sizeof f);
        slice_max[s] = m > 0x7F800000u ? NAN : f;
    }
    for (int64_t c = 0; c < channels; c++) amax[c] = 0.0f;
    for (int64_t s = 0; s < slices; s++) {
        float a = slice_max[s], *m = amax + s % channels;
        if (*m == *m && (a > *m || a != a)) *m = a; /* a NaN, once there, stays */
    }
    free(slice_max);
}

/* Advance the running (slice end, channel) of element i: slices are visited in order, so no division. */
static void seek_channel(int64_t i, int64_t inner, int64_t channels, int64_t *end, int64_t *c) {
    while (i >= *end) {
        *end += inner;
        if (++*c == channels) *c = 0;
    }
}

/* q <- the entries of x at the set bits, in order, as clamp(round_half_even(x_i / scale[c]), -127, 127);
   counts as written by fm_select_above. */
void fm_gather_quantize(const float *x, int64_t n, const uint8_t *bitmap, const int64_t *counts, const float *scale,
                        int64_t inner, int64_t channels, int8_t *q) {
    int64_t nbytes = (n + 7) / 8, nb = block_count(nbytes);
    int64_t *start = count_starts(counts, nb);
    #pragma omp parallel for schedule(static)
    for (int64_t k = 0; k < nb; k++) {
        int8_t *out = q + start[k];
        int64_t slice = 8 * k * BLOCK / inner, end = (slice + 1) * inner, c = slice % channels;
        for (int64_t b = k * BLOCK, stop = block_end(k, nbytes); b < stop; b++) {
            for (unsigned bits = bitmap[b]; bits; ) {
                int j = __builtin_clz(bits << 24);
                int64_t i = 8 * b + j;
                seek_channel(i, inner, channels, &end, &c);
                float v = nearbyintf(x[i] / scale[c]);
                *out++ = (int8_t)(v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v));
                bits &= ~(0x80u >> j);
            }
        }
    }
    free(start);
}

/* out (n floats) <- (values at the set bits, +0.0 elsewhere) * scale[c], every entry multiplied as
   torch's decode-then-mul_ does. Returns the bitmap's popcount; out is only written when it equals nnz. */
int64_t fm_scatter_scaled(const float *values, int64_t nnz, const uint8_t *bitmap, int64_t n, const float *scale,
                          int64_t inner, int64_t channels, float *out) {
    int64_t nbytes = (n + 7) / 8, nb = block_count(nbytes);
    int64_t *start = block_starts(bitmap, nbytes, nb), total = start[nb];
    if (total == nnz) {
        #pragma omp parallel for schedule(static)
        for (int64_t k = 0; k < nb; k++) {
            const float *v = values + start[k], *v_end = values + nnz;
            int64_t slice = 8 * k * BLOCK / inner, end = (slice + 1) * inner, c = slice % channels;
            for (int64_t b = k * BLOCK, stop = block_end(k, nbytes); b < stop; b++) {
                unsigned bits = bitmap[b];
                seek_channel(8 * b, inner, channels, &end, &c);
                if (8 * b + 8 <= end && 8 * b + 8 <= n && v + 8 <= v_end) {
                    /* one channel for the whole byte: fm_scatter's branch-free lanes, then the product */
                    const uint32_t *m = lanes[bits], *vi = (const uint32_t *)v;
                    const uint8_t *r = rank_before[bits];
                    float s = scale[c];
                    for (int j = 0; j < 8; j++) {
                        uint32_t u = vi[r[j]] & m[j];
                        float e;
                        memcpy(&e, &u, sizeof e);
                        out[8 * b + j] = e * s;
                    }
                    v += __builtin_popcount(bits);
                    continue;
                }
                for (int64_t i = 8 * b, j = 0; i < n && j < 8; i++, j++) {
                    seek_channel(i, inner, channels, &end, &c);
                    out[i] = ((bits >> (7 - j)) & 1 ? *v++ : 0.0f) * scale[c];
                }
            }
        }
    }
    free(start);
    return total;
}
