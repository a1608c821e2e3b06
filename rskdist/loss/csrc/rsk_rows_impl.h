/* Body of rsk_rows.c for one element type (REAL, EXP, NAME); see that file. */

/* Items per partial sum: sums of REAL over at most this many terms, then added in double. */
#define RSK_CHUNK 1024
/* Items per tile of the second pass. */
#define RSK_TILE 512

/* sigma(x) and sigma'(x) = sigma(x) (1 - sigma(x)), written sigma * (sigma * e) with
 * e = exp(-x) so that it stays accurate where sigma is near 1 and sigma' tiny. */
static inline void NAME(sigmoid_pair)(REAL x, REAL *s, REAL *d) {
    x = x < -RSK_CLAMP ? -RSK_CLAMP : (x > RSK_CLAMP ? RSK_CLAMP : x);
    REAL e = EXP(-x);
    REAL sig = 1 / (1 + e);
    *s = sig;
    *d = sig * (sig * e);
}

/* Pass 1 for one query: for every positive p, sums over all z of sigma and sigma' of
 * t_z - tp[p] (in REAL over tiles of RSK_CHUNK items, then in double); sigma' is written
 * to keep[p * n + z] when keep is not NULL. Tiles of z outside, positives inside, so a
 * tile of t is read from memory once and from L1 for every positive. */
static void NAME(rank_sums)(const REAL *t, int64_t n, const REAL *tp, int64_t np, REAL *keep, double *above,
                            double *dsum) {
    for (int64_t p = 0; p < np; p++) above[p] = dsum[p] = 0;
    for (int64_t z0 = 0; z0 < n; z0 += RSK_CHUNK) {
        const int64_t len = z0 + RSK_CHUNK < n ? RSK_CHUNK : n - z0;
        const REAL *tz = t + z0;
        for (int64_t p = 0; p < np; p++) {
            const REAL tpp = tp[p];
            REAL cs = 0, cd = 0;
            if (keep) {
                REAL *kz = keep + p * n + z0;
#pragma omp simd reduction(+ : cs, cd)
                for (int64_t z = 0; z < len; z++) {
                    REAL s, d;
                    NAME(sigmoid_pair)(tz[z] - tpp, &s, &d);
                    kz[z] = d;
                    cs += s;
                    cd += d;
                }
            } else {
#pragma omp simd reduction(+ : cs, cd)
                for (int64_t z = 0; z < len; z++) {
                    REAL s, d;
                    NAME(sigmoid_pair)(tz[z] - tpp, &s, &d);
                    cs += s;
                    cd += d;
                }
            }
            above[p] += cs;
            dsum[p] += cd;
        }
    }
}

/* One query's recall surrogate from its ranks: returns its loss (times scale) and writes
 * d loss / d rank_p into grad_rank (when not NULL). Same formula as recall_surrogate in
 * rskdist/loss/fused.py: R_k = min(sum_p sigma((k - rank_p) / tau1), k) / min(k, P). */
static double NAME(recall)(const double *rank, int64_t np, const double *ks, int64_t num_ks, double tau1,
                           double scale, double *grad_rank) {
    double mean_r = 0;
    if (grad_rank)
        for (int64_t p = 0; p < np; p++) grad_rank[p] = 0;
    for (int64_t k = 0; k < num_ks; k++) {
        double hits = 0;
        for (int64_t p = 0; p < np; p++) hits += 1 / (1 + exp(-(ks[k] - rank[p]) / tau1));
        double denom = (double)np < ks[k] ? (double)np : ks[k];
        mean_r += (hits < ks[k] ? hits : ks[k]) / denom;
        if (grad_rank && hits <= ks[k]) {
            /* d loss / d hits = -scale / (|ks| denom); d hits / d rank_p = -sigma' / tau1 */
            double dhits = -scale / ((double)num_ks * denom);
            for (int64_t p = 0; p < np; p++) {
                double sk = 1 / (1 + exp(-(ks[k] - rank[p]) / tau1));
                grad_rank[p] += dhits * sk * (1 - sk) * (-1 / tau1);
            }
        }
    }
    return (1 - mean_r / (double)num_ks) * scale;
}

/* Loss (times scale, summed over the rows) of n_rows queries; when dsim is not NULL, also
 * d loss / d s for their real similarity rows, written to dsim (n_rows x n_real).
 *
 *   sim      (n_rows x n_real) real similarity rows, row stride sim_stride
 *   first, second, alpha   (n_virtual) the SiMix items, or NULL when n_virtual == 0
 *   q        (n_rows) each row's query in extended indices (virtual queries are >= n_real)
 *   pos      (n_rows x width) positives in extended indices, num_pos[i] of them valid
 *   keep     1: pass 2 reads sigma' kept by pass 1; 0: it evaluates sigma' again
 * Returns NAN if scratch memory cannot be allocated (nothing is written then). */
double NAME(rsk_rows)(const REAL *sim, int64_t sim_stride, int64_t n_rows, int64_t n_real, int64_t n_virtual,
                      const int64_t *first, const int64_t *second, const REAL *alpha, const int64_t *q,
                      const int64_t *pos, int64_t width, const int64_t *num_pos, const double *ks, int64_t num_ks,
                      double tau1, double tau2, int count_self, double scale, int keep, REAL *dsim,
                      int64_t dsim_stride) {
    const int64_t n = n_real + n_virtual;
    const REAL inv_t2 = (REAL)(1 / tau2);
    REAL *t = malloc(sizeof(REAL) * n);
    REAL *g = dsim ? malloc(sizeof(REAL) * n) : NULL;
    REAL *kept = dsim && keep ? malloc(sizeof(REAL) * n * (width > 0 ? width : 1)) : NULL;
    double *work = malloc(sizeof(double) * 5 * (width > 0 ? width : 1));
    if (!t || !work || (dsim && !g) || (dsim && keep && !kept)) {
        free(t), free(g), free(kept), free(work);
        return NAN;
    }
    double *above = work, *dsum = work + width, *rank = work + 2 * width, *coef = work + 3 * width;
    REAL *tp = (REAL *)(work + 4 * width);
    double total = 0;

    for (int64_t i = 0; i < n_rows; i++) {
        const REAL *row = sim + i * sim_stride;
        const int64_t *pos_i = pos + i * width;
        const int64_t np = num_pos[i], qi = q[i];
        for (int64_t z = 0; z < n_real; z++) t[z] = row[z] * inv_t2;
        for (int64_t v = 0; v < n_virtual; v++)
            t[n_real + v] = alpha[v] * t[first[v]] + (1 - alpha[v]) * t[second[v]];

        /* pass 1, then take out the terms of z == p and z == q (unless count_self) */
        for (int64_t p = 0; p < np; p++) tp[p] = t[pos_i[p]];
        NAME(rank_sums)(t, n, tp, np, kept, above, dsum);
        for (int64_t p = 0; p < np; p++) {
            REAL s, d;
            NAME(sigmoid_pair)(0, &s, &d);
            above[p] -= s, dsum[p] -= d;
            if (!count_self) {
                NAME(sigmoid_pair)(t[qi] - tp[p], &s, &d);
                above[p] -= s, dsum[p] -= d;
            }
            rank[p] = 1 + above[p];
        }
        total += NAME(recall)(rank, np, ks, num_ks, tau1, scale, dsim ? coef : NULL);
        if (!dsim) continue;

        /* pass 2: g_z = sum_p coef_p sigma'(t_z - t_p) over all z (corrected below), by
         * tiles of z so that the tile of g being summed into stays in L1 */
        for (int64_t p = 0; p < np; p++) coef[p] *= inv_t2;
        for (int64_t z0 = 0; z0 < n; z0 += RSK_TILE) {
            const int64_t len = z0 + RSK_TILE < n ? RSK_TILE : n - z0;
            REAL *gz = g + z0;
            const REAL *tz = t + z0;
            for (int64_t z = 0; z < len; z++) gz[z] = 0;
            for (int64_t p = 0; p < np; p++) {
                const REAL c = (REAL)coef[p], tpp = tp[p];
                if (kept) {
                    const REAL *kz = kept + p * n + z0;
#pragma omp simd
                    for (int64_t z = 0; z < len; z++) gz[z] += c * kz[z];
                } else {
#pragma omp simd
                    for (int64_t z = 0; z < len; z++) {
                        REAL s, d;
                        NAME(sigmoid_pair)(tz[z] - tpp, &s, &d);
                        gz[z] += c * d;
                    }
                }
            }
        }
        for (int64_t p = 0; p < np; p++) {
            REAL s, d;
            NAME(sigmoid_pair)(0, &s, &d);
            /* z == p was summed above: take it out; then d rank_p / d s_p = -dsum_p / tau2 */
            g[pos_i[p]] -= (REAL)coef[p] * d;
            g[pos_i[p]] -= (REAL)(coef[p] * dsum[p]);
        }
        if (!count_self) g[qi] = 0; /* every term of z == q is left out */

        /* fold virtual columns onto their real parents */
        REAL *out = dsim + i * dsim_stride;
        memcpy(out, g, sizeof(REAL) * n_real);
        for (int64_t v = 0; v < n_virtual; v++) {
            out[first[v]] += alpha[v] * g[n_real + v];
            out[second[v]] += (1 - alpha[v]) * g[n_real + v];
        }
    }
    free(t), free(g), free(kept), free(work);
    return total;
}

#undef RSK_CHUNK
#undef RSK_TILE
