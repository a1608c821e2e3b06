/* Body of rsk_rows.c for one element type (REAL, EXP, NAME); see that file. */

/* Items per partial sum: sums of REAL over at most this many terms, then added in double. */
#define RSK_CHUNK 1024
/* Items per tile of the second pass. */
#define RSK_TILE 512

/* sigma(x) and sigma'(x) from e = exp(-x): sigma = 1 / (1 + e), sigma' = sigma (sigma e),
 * accurate where sigma is near 1 and sigma' tiny. */
static inline void NAME(sigmoid_of_e)(REAL e, REAL *s, REAL *d) {
    REAL sig = 1 / (1 + e);
    *s = sig;
    *d = sig * (sig * e);
}

/* u_z = exp(clamp(c - t_z, -lim, lim)) over all z (vectorised: one exp per item). */
static void NAME(exp_row)(const REAL *t, int64_t n, REAL c, REAL lim, REAL *u) {
#pragma omp simd
    for (int64_t z = 0; z < n; z++) {
        REAL x = c - t[z];
        x = x < -lim ? -lim : (x > lim ? lim : x);
        u[z] = EXP(x);
    }
}

/* Pass 1 for the positives of one group: for every p, sums over all z of sigma and sigma'
 * with e = v[p] u_z (in REAL over tiles of RSK_CHUNK items, then in double). Tiles of z
 * outside, positives inside, so a tile of u is read from memory once per group. */
static void NAME(rank_sums)(const REAL *u, int64_t n, const REAL *v, const int64_t *members, int64_t count,
                            double *above, double *dsum) {
    for (int64_t j = 0; j < count; j++) above[members[j]] = dsum[members[j]] = 0;
    for (int64_t z0 = 0; z0 < n; z0 += RSK_CHUNK) {
        const int64_t len = z0 + RSK_CHUNK < n ? RSK_CHUNK : n - z0;
        const REAL *uz = u + z0;
        for (int64_t j = 0; j < count; j++) {
            const int64_t p = members[j];
            const REAL vp = v[p];
            REAL cs = 0, cd = 0;
#pragma omp simd reduction(+ : cs, cd)
            for (int64_t z = 0; z < len; z++) {
                REAL s, d;
                NAME(sigmoid_of_e)(vp * uz[z], &s, &d);
                cs += s;
                cd += d;
            }
            above[p] += cs;
            dsum[p] += cd;
        }
    }
}

/* Pass 2 for one positive over a tile: gz[z] += cp sigma'(x) with e = vp u_z. Not inlined:
 * inlined, gcc fused the loops of two positives and reloaded the second one's vp with a
 * gather at every item (the store to gz might alias it); here vp and cp come by value. */
__attribute__((noinline)) static void NAME(add_weighted)(REAL *restrict gz, const REAL *restrict uz, int64_t len,
                                                         REAL vp, REAL cp) {
#pragma omp simd
    for (int64_t z = 0; z < len; z++) {
        REAL s, d;
        NAME(sigmoid_of_e)(vp * uz[z], &s, &d);
        gz[z] += cp * d;
    }
}

/* One query's recall surrogate from its ranks: returns its loss (times scale) and writes
 * d loss / d rank_p into grad_rank (when not NULL). Same formula as recall_surrogate in
 * rskdist/loss/blocks.py: R_k = min(sum_p sigma((k - rank_p) / tau1_k), k) / min(k, P),
 * one temperature tau1[k] per k. */
static double NAME(recall)(const double *rank, int64_t np, const double *ks, int64_t num_ks, const double *tau1,
                           double scale, double *grad_rank) {
    double mean_r = 0;
    if (grad_rank)
        for (int64_t p = 0; p < np; p++) grad_rank[p] = 0;
    for (int64_t k = 0; k < num_ks; k++) {
        double hits = 0;
        for (int64_t p = 0; p < np; p++) hits += 1 / (1 + exp(-(ks[k] - rank[p]) / tau1[k]));
        double denom = (double)np < ks[k] ? (double)np : ks[k];
        mean_r += (hits < ks[k] ? hits : ks[k]) / denom;
        if (grad_rank && hits <= ks[k]) {
            /* d loss / d hits = -scale / (|ks| denom); d hits / d rank_p = -sigma' / tau1_k */
            double dhits = -scale / ((double)num_ks * denom);
            for (int64_t p = 0; p < np; p++) {
                double sk = 1 / (1 + exp(-(ks[k] - rank[p]) / tau1[k]));
                grad_rank[p] += dhits * sk * (1 - sk) * (-1 / tau1[k]);
            }
        }
    }
    return (1 - mean_r / (double)num_ks) * scale;
}

/* Split the positives of a query into groups of nearby t_p: order (np) lists them by t_p
 * and group g is order[bounds[g] .. bounds[g + 1]); within a group t_p spans at most
 * 2 * RSK_HALF. Returns the number of groups. */
static int64_t NAME(group_positives)(const REAL *tp, int64_t np, int64_t *order, int64_t *bounds) {
    for (int64_t j = 0; j < np; j++) {
        int64_t k = j;
        for (; k > 0 && tp[order[k - 1]] > tp[j]; k--) order[k] = order[k - 1];
        order[k] = j;
    }
    int64_t groups = 0;
    for (int64_t j = 0; j < np; j++)
        if (j == 0 || tp[order[j]] - tp[order[bounds[groups - 1]]] > 2 * RSK_HALF) bounds[groups++] = j;
    bounds[groups] = np;
    return groups;
}

/* Loss (times scale, summed over the rows) of the queries in rows [row_begin, row_end) of
 * the block described by `a` (struct rsk_rows_args in rsk_rows.c), added to *loss; when
 * a->dsim is not NULL, also d loss / d s for their real similarity rows, written to the
 * same rows of dsim (n_rows x n_real). Returns 0, or RSK_ENOMEM when scratch memory
 * cannot be allocated (nothing is written then).
 *
 * The kernel keeps a query's n = n_real + n_virtual items in a layout of its caller's
 * choosing (rskdist/loss/native.py puts each class's real and virtual items side by side,
 * so that building a virtual item from its parents and folding it back are local):
 *   sim      (n_rows x n_real) real similarity rows in batch order, row stride sim_stride
 *   real_at, real_col   (n_real) layout position and batch column of each real item
 *   virt_at, first, second, alpha   (n_virtual) layout position of each SiMix item, of its
 *            two parents, and its weight; NULL when n_virtual == 0
 *   q        (n_rows) each row's query, a layout position
 *   pos      (n_rows x width) positives as layout positions, num_pos[i] of them valid
 *   ks, tau1 (num_ks) the k values and the recall sigmoid's temperature of each */
int NAME(rsk_rows)(const struct rsk_rows_args *a, int64_t row_begin, int64_t row_end, double *loss) {
    const REAL *sim = a->sim, *alpha = a->alpha;
    REAL *dsim = a->dsim;
    const int64_t n_real = a->n_real, n_virtual = a->n_virtual, width = a->width;
    const int64_t *real_at = a->real_at, *real_col = a->real_col, *virt_at = a->virt_at;
    const int64_t *first = a->first, *second = a->second;
    const int64_t n = n_real + n_virtual, w = width > 0 ? width : 1;
    const REAL inv_t2 = (REAL)(1 / a->tau2);
    REAL *t = malloc(sizeof(REAL) * n);
    REAL *g = dsim ? malloc(sizeof(REAL) * n) : NULL;
    REAL *u = malloc(sizeof(REAL) * n * w);
    double *work = malloc(sizeof(double) * 6 * w);
    int64_t *index = malloc(sizeof(int64_t) * (2 * w + 1));
    if (!t || !u || !work || !index || (dsim && !g)) {
        free(t), free(g), free(u), free(work), free(index);
        return RSK_ENOMEM;
    }
    double *above = work, *dsum = work + w, *rank = work + 2 * w, *coef = work + 3 * w;
    REAL *tp = (REAL *)(work + 4 * w), *ep = (REAL *)(work + 5 * w);
    int64_t *order = index, *bounds = index + w;
    double total = 0;

    for (int64_t i = row_begin; i < row_end; i++) {
        const REAL *row = sim + i * a->sim_stride;
        const int64_t *pos_i = a->pos + i * width;
        const int64_t np = a->num_pos[i], qi = a->q[i];
        for (int64_t k = 0; k < n_real; k++) t[real_at[k]] = row[real_col[k]] * inv_t2;
        for (int64_t k = 0; k < n_virtual; k++) t[virt_at[k]] = alpha[k] * t[first[k]] + (1 - alpha[k]) * t[second[k]];
        for (int64_t p = 0; p < np; p++) tp[p] = t[pos_i[p]];

        /* pass 1 per group of positives with centre c: e_pz = exp(t_p - t_z) = v_p u_z,
         * v_p = exp(t_p - c), u_z = exp(c - t_z) clamped so that |log e| <= RSK_CLAMP;
         * then take out the terms of z == p and z == q (unless count_self) */
        const int64_t groups = NAME(group_positives)(tp, np, order, bounds);
        for (int64_t k = 0; k < groups; k++) {
            const int64_t *members = order + bounds[k], count = bounds[k + 1] - bounds[k];
            const REAL lo = tp[members[0]], hi = tp[members[count - 1]];
            const REAL c = lo + (hi - lo) / 2;
            REAL *uk = u + k * n;
            NAME(exp_row)(t, n, c, RSK_CLAMP - (hi - lo) / 2, uk);
            for (int64_t j = 0; j < count; j++) ep[members[j]] = EXP(tp[members[j]] - c);
            NAME(rank_sums)(uk, n, ep, members, count, above, dsum);
            for (int64_t j = 0; j < count; j++) {
                const int64_t p = members[j];
                REAL s, d;
                NAME(sigmoid_of_e)(ep[p] * uk[pos_i[p]], &s, &d);
                above[p] -= s, dsum[p] -= d;
                if (!a->count_self) {
                    NAME(sigmoid_of_e)(ep[p] * uk[qi], &s, &d);
                    above[p] -= s, dsum[p] -= d;
                }
            }
        }
        for (int64_t p = 0; p < np; p++) rank[p] = 1 + above[p];
        total += NAME(recall)(rank, np, a->ks, a->num_ks, a->tau1, a->scale, dsim ? coef : NULL);
        if (!dsim) continue;

        /* pass 2: g_z = sum_p coef_p sigma'(t_z - t_p) over all z (corrected below), by
         * tiles of z so that the tile of g being summed into stays in L1 */
        for (int64_t p = 0; p < np; p++) coef[p] *= inv_t2;
        for (int64_t z0 = 0; z0 < n; z0 += RSK_TILE) {
            const int64_t len = z0 + RSK_TILE < n ? RSK_TILE : n - z0;
            REAL *gz = g + z0;
            for (int64_t z = 0; z < len; z++) gz[z] = 0;
            for (int64_t k = 0; k < groups; k++) {
                const REAL *uz = u + k * n + z0;
                for (int64_t j = bounds[k]; j < bounds[k + 1]; j++) {
                    const int64_t p = order[j];
                    NAME(add_weighted)(gz, uz, len, ep[p], (REAL)coef[p]);
                }
            }
        }
        for (int64_t k = 0; k < groups; k++) {
            for (int64_t j = bounds[k]; j < bounds[k + 1]; j++) {
                const int64_t p = order[j];
                REAL s, d;
                NAME(sigmoid_of_e)(ep[p] * u[k * n + pos_i[p]], &s, &d);
                /* z == p was summed above: take it out; then d rank_p / d s_p = -dsum_p / tau2 */
                g[pos_i[p]] -= (REAL)coef[p] * d;
                g[pos_i[p]] -= (REAL)(coef[p] * dsum[p]);
            }
        }
        if (!a->count_self) g[qi] = 0; /* every term of z == q is left out */

        /* fold virtual columns onto their real parents, then the real ones out in batch order */
        for (int64_t k = 0; k < n_virtual; k++) {
            g[first[k]] += alpha[k] * g[virt_at[k]];
            g[second[k]] += (1 - alpha[k]) * g[virt_at[k]];
        }
        REAL *out = dsim + i * a->dsim_stride;
        for (int64_t k = 0; k < n_real; k++) out[real_col[k]] = g[real_at[k]];
    }
    free(t), free(g), free(u), free(work), free(index);
    *loss += total;
    return 0;
}

#undef RSK_CHUNK
#undef RSK_TILE
